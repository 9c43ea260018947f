"""Health, request ids, the error envelope and authentication, on the fake sandbox."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.services.tokens import Role


def test_health_needs_no_token_and_names_the_version(client: TestClient) -> None:
    resp = client.get("/health", headers={"Authorization": ""})
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "version": "0.1.0"}


def test_request_id_is_echoed_when_sane_and_made_when_not(client: TestClient) -> None:
    echoed = client.get("/health", headers={"X-Request-ID": "ci-job-42.step:7"})
    assert echoed.headers["X-Request-ID"] == "ci-job-42.step:7"
    fresh = client.get("/health", headers={"X-Request-ID": "bad id<script>"})
    assert fresh.headers["X-Request-ID"] not in ("", "bad id<script>")
    assert len(fresh.headers["X-Request-ID"]) >= 16


def test_errors_carry_the_envelope_and_the_request_id(client: TestClient) -> None:
    resp = client.post(
        "/run_py",
        json={"code": "print(1)"},
        headers={"Authorization": "Bearer nox_wrong", "X-Request-ID": "trace-1"},
    )
    assert resp.status_code == 401
    assert resp.json() == {
        "error": {
            "code": "unauthorized",
            "message": "unknown, expired or revoked token",
            "request_id": "trace-1",
        }
    }
    assert resp.headers["content-type"] == "application/json"


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    resp = client.get("/nope")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


def test_wrong_method_is_a_json_405(client: TestClient) -> None:
    resp = client.get("/run_py")
    assert resp.status_code == 405
    assert resp.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "missing bearer token"),
        ("Bearer", "malformed"),
        ("Basic dXNlcjpwYXNz", "malformed"),
        ("Bearer nox_" + "x" * 43, "unknown"),
        ("Bearer not-even-a-nox-token", "unknown"),
    ],
)
def test_run_without_a_valid_token_is_401(
    client: TestClient, header: str | None, fragment: str
) -> None:
    headers = {"Authorization": header} if header is not None else {"Authorization": ""}
    resp = client.post("/run_py", json={"code": "print(1)"}, headers=headers)
    assert resp.status_code == 401
    assert fragment in resp.json()["error"]["message"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_viewer_may_not_run_or_upload(client: TestClient, make_token) -> None:  # type: ignore[no-untyped-def]
    viewer = {"Authorization": f"Bearer {make_token(Role.VIEWER)}"}
    run = client.post("/run_sh", json={"cmd": "echo hi"}, headers=viewer)
    assert run.status_code == 403
    assert run.json()["error"]["code"] == "forbidden"
    put = client.post("/put", files={"file": ("a.txt", b"x")}, headers=viewer)
    assert put.status_code == 403


def test_runner_token_may_run(client: TestClient, make_token) -> None:  # type: ignore[no-untyped-def]
    runner = {"Authorization": f"Bearer {make_token(Role.RUNNER)}"}
    resp = client.post("/run_sh", json={"cmd": "echo hi"}, headers=runner)
    assert resp.status_code == 200
    assert resp.json()["actor"] == "test-runner"


def test_env_api_token_is_an_admin(settings: Settings, fake: FakeSandbox) -> None:
    settings = load_settings(data_dir=settings.data_dir, api_token="s3cret-from-env")
    with TestClient(create_app(settings, sandbox=fake)) as c:
        ok = c.post(
            "/run_py",
            json={"code": "print(5)"},
            headers={"Authorization": "Bearer s3cret-from-env"},
        )
        assert ok.status_code == 200
        assert ok.json()["stdout"] == "5\n"
        assert ok.json()["actor"] == "NOX_API_TOKEN"
        bad = c.post(
            "/run_py",
            json={"code": "print(5)"},
            headers={"Authorization": "Bearer s3cret-from-envX"},
        )
        assert bad.status_code == 401


def test_an_unexpected_error_is_a_500_envelope_with_the_request_id(
    settings: Settings, admin_token: str
) -> None:
    from tests.conftest import error_message

    from nox_api.engine.base import Result, RunSpec

    def boom(spec: RunSpec) -> Result:
        raise RuntimeError("a bug, for this test")

    app = create_app(settings, sandbox=FakeSandbox(handler=boom))
    auth = {"Authorization": f"Bearer {admin_token}", "X-Request-ID": "bug-hunt-1"}
    with TestClient(app, raise_server_exceptions=False) as c:
        resp = c.post("/run_py", json={"code": "print(1)"}, headers=auth)
        message = error_message(resp, 500, "internal")  # header and body ids agree
    assert resp.headers["X-Request-ID"] == "bug-hunt-1"
    assert "request id identifies it" in message
    assert "RuntimeError" not in resp.text  # no traceback in the answer
