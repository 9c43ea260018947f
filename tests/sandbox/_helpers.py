"""What the real-sandbox tests share: run code through HTTP and get the Execution back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from tests.conftest import _token

from nox_api.app import create_app
from nox_api.config import load_settings
from nox_api.services.tokens import Role

SANDBOX_UID = 65534


def run_py(client: TestClient, code: str, **fields: Any) -> dict[str, Any]:
    fields.setdefault("timeout_s", 10)
    resp = client.post("/run_py", json={"code": code, **fields})
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def run_sh(client: TestClient, cmd: str, **fields: Any) -> dict[str, Any]:
    fields.setdefault("timeout_s", 10)
    resp = client.post("/run_sh", json={"cmd": cmd, **fields})
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def maxima_policy(folder: Path, **maxima: int) -> Path:
    """A policy file whose ``limits.maxima`` are the defaults but for ``maxima``."""
    path = folder / "policy.yaml"
    lines = ["limits:", "  maxima:"] + [f"    {name}: {value}" for name, value in maxima.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def own_server(
    data_dir: Path, maxima: dict[str, int] | None = None, **overrides: Any
) -> Iterator[TestClient]:
    """A server of its own settings on the real sandbox (the shared fixture's cannot change),
    with an admin token in its client's headers; ``maxima`` narrow the policy's limits."""
    if maxima:
        overrides["policy_file"] = maxima_policy(data_dir.parent, **maxima)
    settings = load_settings(data_dir=data_dir, **overrides)
    token = _token(settings, Role.ADMIN)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.app.state.nox.sandbox.info().available  # type: ignore[attr-defined]
        yield c
