"""The public surface stays curated: sorted ``__all__`` everywhere it exists, every listed name
importable, and the SDK importable without the server's dependencies."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import nox_api
import noxsdk

_SKIP = {"nox_api.__main__", "nox_api.engine._bootstrap"}  # run on import, by design


def _modules() -> list[str]:
    names = ["noxsdk", "nox_api"]
    for pkg in (nox_api, noxsdk):
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            if info.name not in _SKIP and ".migrations" not in info.name:
                names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_all_is_sorted_and_importable(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        return
    assert list(exported) == sorted(exported), f"{name}.__all__ is not sorted"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names {attr}, which does not exist"


def test_the_sdk_imports_without_server_dependencies() -> None:
    code = (
        "import sys, noxsdk, noxsdk.models\n"
        "heavy = {'fastapi', 'starlette', 'sqlalchemy', 'alembic', 'uvicorn', 'nox_api'}\n"
        "loaded = heavy & {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
