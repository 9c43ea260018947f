"""The SDK installs and works with only its own dependencies: its wheel, built from sdk/, goes
into a fresh virtualenv that sees exactly the distributions the wheel requires (and theirs) and
no FastAPI; a client there talks to a real server."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import Distribution, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import Server

pytestmark = pytest.mark.sandbox

SDK_DIR = Path(__file__).resolve().parents[2] / "sdk"
SERVER_ONLY = {"fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "nox-api"}


def _run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    argv_text = [str(a) for a in argv]
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        argv_text, check=False, capture_output=True, text=True, timeout=120, **kwargs
    )


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        headers = Parser().parsestr(archive.read(metadata).decode())
    return headers.get_all("Requires-Dist") or []


def _closure(requirements: list[str]) -> dict[str, Distribution]:
    """The installed distributions that ``requirements`` need, transitively (no extras)."""
    found: dict[str, Distribution] = {}
    todo = list(requirements)
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name not in found:
            found[name] = dist = distribution(requirement.name)
            todo.extend(dist.requires or [])
    return found


def _shelf(dists: dict[str, Distribution], folder: Path) -> None:
    """Links to the top-level modules, packages and metadata of ``dists`` in ``folder``."""
    folder.mkdir()
    for dist in dists.values():
        tops = {f.parts[0] for f in dist.files or () if f.parts[0] not in ("..", "__pycache__")}
        for top in tops - {t for t in tops if t.endswith(".pth")}:
            (folder / top).symlink_to(Path(str(dist.locate_file(top))))


def test_the_sdk_works_in_a_virtualenv_without_fastapi(server: Server, tmp_path: Path) -> None:
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path, SDK_DIR)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("noxsdk-*.whl")
    requirements = _requirements(wheel)
    assert {canonicalize_name(Requirement(r).name) for r in requirements} >= {"httpx2", "pydantic"}

    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", "--without-pip", venv).returncode == 0
    python = venv / "bin" / "python"
    installed = _run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
        "--no-index", wheel,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr

    dependencies = _closure(requirements)
    assert not SERVER_ONLY & set(dependencies), sorted(dependencies)
    _shelf(dependencies, tmp_path / "deps")
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(site.stdout.strip()) / "noxsdk-deps.pth").write_text(f"{tmp_path / 'deps'}\n")

    env = {"PATH": os.environ["PATH"], "NOX_URL": server.url, "NOX_API_TOKEN": server.token}
    no_fastapi = _run(python, "-c", "import fastapi", env=env, cwd=tmp_path)
    assert "No module named 'fastapi'" in no_fastapi.stderr
    code = (
        "import sys, noxsdk\n"
        "with noxsdk.NoxClient() as client:\n"
        "    print(client.health().status, client.me().role.value)\n"
        "print(noxsdk.__file__)\n"
        "print(sorted({'fastapi', 'starlette', 'nox_api'} & set(sys.modules)))\n"
    )
    used = _run(python, "-c", code, env=env, cwd=tmp_path)
    assert used.returncode == 0, used.stderr
    status, location, heavy = used.stdout.splitlines()
    assert status == "ok admin"
    assert location.startswith(str(venv))  # the installed wheel, not the work tree
    assert heavy == "[]"
