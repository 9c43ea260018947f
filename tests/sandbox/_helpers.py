"""What the real-sandbox tests share: run code through HTTP and get the Execution back."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

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
