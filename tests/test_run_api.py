"""/run_py and /run_sh on the fake sandbox: validation, limits, history, errors."""

from __future__ import annotations

import threading
import time

import httpx2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from tests.conftest import hold_saves, nox_of, uvicorn_serving, write_policy

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.base import Result, RunSpec
from nox_api.engine.fake import FakeSandbox
from nox_api.services.auditing import Caller
from nox_api.services.policy import Policy
from nox_api.services.tokens import Principal, Role
from nox_api.storage.models import ExecutionRow
from noxsdk.models import RunPython


def test_run_py_answers_an_execution(client: TestClient, fake: FakeSandbox) -> None:
    resp = client.post("/run_py", json={"code": "print('hi')"}, headers={"X-Request-ID": "r-1"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["kind"] == "python"
    assert body["status"] == "ok"
    assert body["exit_code"] == 0
    assert body["stdout"] == "hi\n"
    assert body["workspace"] == "default"
    assert body["actor"] == "test-admin"
    assert body["request_id"] == "r-1"
    assert body["limits"]["timeout_s"] == 10.0
    assert body["limits"]["cpu_s"] == 10
    assert "code" not in body
    assert fake.runs[0].kind == "python"


def test_exit_code_is_reported_with_http_200(client: TestClient) -> None:
    resp = client.post("/run_sh", json={"cmd": "exit 3"})
    assert resp.status_code == 200
    assert resp.json()["status"] == "error"
    assert resp.json()["exit_code"] == 3


def test_stdin_env_and_limits_reach_the_sandbox(client: TestClient, fake: FakeSandbox) -> None:
    resp = client.post(
        "/run_sh",
        json={
            "cmd": "cat",
            "stdin": "data\n",
            "env": {"FOO": "bar"},
            "timeout_s": 2.5,
            "memory_mib": 64,
        },
    )
    assert resp.json()["stdout"] == "data\n"
    spec: RunSpec = fake.runs[-1]
    assert spec.stdin == b"data\n"
    assert dict(spec.env) == {"FOO": "bar"}
    assert spec.limits.timeout_s == 2.5
    assert spec.limits.cpu_s == 3  # the wall time rounded up
    assert spec.limits.memory_mib == 64
    assert spec.workspace.name == "default"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"code": "print(1)", "timeout_s": 61}, "timeout_s 61 is above the policy's maximum"),
        ({"code": "print(1)", "memory_mib": 4096}, "memory_mib 4096 is above"),
        ({"code": "print(1)", "memory_mib": 8}, "at least 16"),
        ({"code": "   "}, "code is empty"),
        ({"code": "print(1)\x00"}, "NUL"),
    ],
)
def test_bad_limits_and_code_are_refused_with_400(
    client: TestClient, fake: FakeSandbox, body: dict[str, object], fragment: str
) -> None:
    resp = client.post("/run_py", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_request"
    assert fragment in resp.json()["error"]["message"]
    assert fake.runs == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "code: Field required"),
        ({"code": 5}, "code: Input should be a valid string"),
        ({"code": "x", "timeout": 5}, "timeout: Extra inputs are not permitted"),
        ({"code": "x", "timeout_s": -1}, "timeout_s: Input should be greater than 0"),
        ({"code": "x", "env": {"1BAD": "x"}}, "must match"),
        ({"code": "x", "env": {"A": "x\x00y"}}, "NUL"),
    ],
)
def test_malformed_bodies_are_422_invalid_request(
    client: TestClient, body: dict[str, object], fragment: str
) -> None:
    resp = client.post("/run_py", json=body)
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "invalid_request"
    assert fragment in resp.json()["error"]["message"]


def test_not_json_is_422(client: TestClient) -> None:
    resp = client.post(
        "/run_py", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "invalid_request"


def test_code_above_the_size_limit_is_413(data_dir, fake: FakeSandbox, make_token) -> None:  # type: ignore[no-untyped-def]
    policy = write_policy(data_dir, "limits:\n  maxima:\n    code_bytes: 1000\n")
    settings = load_settings(data_dir=data_dir, policy_file=policy, pool_size=0)
    with TestClient(create_app(settings, sandbox=fake)) as c:
        token = make_token()
        big = c.post(
            "/run_py", json={"code": "#" * 1001}, headers={"Authorization": f"Bearer {token}"}
        )
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "payload_too_large"
        assert "1001 bytes" in big.json()["error"]["message"]
        ok = c.post(
            "/run_py", json={"code": "#" * 1000}, headers={"Authorization": f"Bearer {token}"}
        )
        assert ok.status_code == 200
    assert len(fake.runs) == 1


def test_body_far_above_the_limit_is_refused_before_it_is_read(
    client: TestClient, fake: FakeSandbox, settings: Settings
) -> None:
    maxima = Policy().limits.maxima
    huge = b'{"code": "' + b"#" * (maxima.code_bytes + maxima.stdin_bytes + 300_000)
    resp = client.post(
        "/run_py", content=huge + b'"}', headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"code": "'
        for _ in range(40):
            yield b"#" * 65536  # no Content-Length: counted as it streams
        yield b'"}'

    streamed = client.post(
        "/run_py", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert fake.runs == []


def test_every_run_is_saved_to_history(client: TestClient) -> None:
    first = client.post("/run_py", json={"code": "print(1)"}).json()
    client.post("/run_sh", json={"cmd": "exit 4", "stdin": "in"})
    nox = client.app.state.nox  # type: ignore[attr-defined]
    nox.executions.settle()  # rows are written by a writer thread just after each answer
    with nox.db.session() as session:
        rows = session.scalars(select(ExecutionRow).order_by(ExecutionRow.started_at)).all()
        assert [(r.kind, r.status, r.exit_code, r.code) for r in rows] == [
            ("python", "ok", 0, "print(1)"),
            ("shell", "error", 4, "exit 4"),
        ]
        assert rows[0].id == first["id"]
        assert rows[0].actor_id is not None
        assert rows[0].started_at.tzinfo is not None
        assert rows[0].limits is not None


def test_history_readers_can_wait_for_rows_written_after_the_answer(client: TestClient) -> None:
    """The writer writes a run's row just after its answer; ``settle`` waits for it."""
    nox = client.app.state.nox  # type: ignore[attr-defined]
    held = hold_saves(nox)
    held["print(2)"] = threading.Event()
    caller = Caller(Principal("env", "tester", Role.RUNNER, "default"), "127.0.0.1", "rid")
    execution = nox.executions.run(caller, RunPython(code="print(2)"))

    def count() -> int:
        with nox.db.session() as session:
            return len(
                session.scalars(select(ExecutionRow).where(ExecutionRow.id == execution.id)).all()
            )

    assert count() == 0  # answered, not yet written
    writer = threading.Timer(0.2, held["print(2)"].set)
    writer.start()
    began = time.monotonic()
    nox.executions.settle(timeout_s=5.0)
    assert time.monotonic() - began >= 0.1
    assert count() == 1
    writer.join()


def test_sandbox_unavailable_is_503_with_the_fix(settings: Settings, admin_token: str) -> None:
    broken = FakeSandbox(unavailable="bubblewrap is not installed: install it with apt-get")
    app = create_app(settings, sandbox=broken)
    with TestClient(app, headers={"Authorization": f"Bearer {admin_token}"}) as c:
        resp = c.post("/run_py", json={"code": "print(1)"})
        assert resp.status_code == 503
        assert resp.json()["error"] == {
            "code": "sandbox_unavailable",
            "message": "bubblewrap is not installed: install it with apt-get",
            "request_id": resp.headers["X-Request-ID"],
        }
        assert c.get("/health").status_code == 200


def test_an_unexpected_error_is_a_json_500_without_a_trace(
    settings: Settings, admin_token: str
) -> None:
    def explode(spec: RunSpec):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret internals")

    app = create_app(settings, sandbox=FakeSandbox(handler=explode))
    with TestClient(
        app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {admin_token}"}
    ) as c:
        resp = c.post("/run_py", json={"code": "print(1)"})
        assert resp.status_code == 500
        assert resp.json()["error"]["code"] == "internal"
        assert "secret internals" not in resp.text
        assert "Traceback" not in resp.text


def test_settle_waits_only_for_runs_answered_before_it(client: TestClient) -> None:
    """A reader is not held by runs answered after it started waiting."""
    nox = client.app.state.nox  # type: ignore[attr-defined]
    held = hold_saves(nox)
    held["print(1)"], held["print(2)"] = threading.Event(), threading.Event()
    caller = Caller(Principal("env", "tester", Role.RUNNER, "default"), "127.0.0.1", "rid")
    nox.executions.run(caller, RunPython(code="print(1)"))
    waited = threading.Event()

    def reader() -> None:
        nox.executions.settle(timeout_s=5.0)
        waited.set()

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.05)
    nox.executions.run(caller, RunPython(code="print(2)"))  # a later run
    assert not waited.wait(0.1)  # the first run's row is not written yet
    held["print(1)"].set()  # the first run's row is written; the second's is held
    assert waited.wait(2.0)
    thread.join()
    held["print(2)"].set()
    nox.executions.settle()


def test_answers_do_not_wait_for_the_history_write(client: TestClient) -> None:
    """The history row and the audit record are written by the writer thread, after the
    answer: a slow database delays them, not the answer; settle() then sees them."""
    nox = client.app.state.nox  # type: ignore[attr-defined]
    release = threading.Event()
    real_save = nox.executions._save

    def slow_save(*args: object) -> None:
        release.wait(5)
        real_save(*args)

    nox.executions._save = slow_save
    try:
        began = time.monotonic()
        answer = client.post("/run_py", json={"code": "print(1)"})
        assert answer.status_code == 200
        assert time.monotonic() - began < 2.0  # not held by the 5 s save
        assert client.get("/api/me").status_code == 200  # the connection is free at once
    finally:
        release.set()
    nox.executions.settle()
    page = client.get("/api/history").json()
    assert [item["id"] for item in page["items"]] == [answer.json()["id"]]
    audited = client.get("/api/audit", params={"action": "run"}).json()["items"]
    assert audited[0]["details"]["id"] == answer.json()["id"]


def test_runs_waiting_for_a_slot_leave_the_other_routes_their_threads(
    settings: Settings, admin_token: str
) -> None:
    """Runs have threads of their own: 50 runs held inside the sandbox (more than the 40
    threads every synchronous route shares) must not keep a history read from answering."""
    release = threading.Event()

    def held(spec: RunSpec) -> Result:
        release.wait(30)
        return Result("ok", 0, b"", b"", False, False, 1.0, 1.0)

    policy = write_policy(
        settings.data_dir.parent, "rate_limits:\n  roles:\n    admin: 100000/minute\n"
    )
    app = create_app(settings.model_copy(update={"policy_file": policy}), sandbox=FakeSandbox(held))
    auth = {"Authorization": f"Bearer {admin_token}"}
    with uvicorn_serving(app) as (url, _server):
        statuses: list[int] = []

        def run_one() -> None:
            with httpx2.Client(base_url=url, headers=auth, timeout=60) as http:
                statuses.append(http.post("/run_py", json={"code": "print(1)"}).status_code)

        runners = [threading.Thread(target=run_one) for _ in range(50)]
        for runner in runners:
            runner.start()
        try:
            time.sleep(1.0)  # every run is now in the server, each held or waiting for a thread
            with httpx2.Client(base_url=url, headers=auth, timeout=10) as http:
                began = time.monotonic()
                assert http.get("/api/history", params={"limit": 1}).status_code == 200
                assert time.monotonic() - began < 3.0
        finally:
            release.set()
            for runner in runners:
                runner.join(60)
        assert statuses == [200] * 50


def test_a_record_made_after_a_runs_answer_follows_the_runs_record(client: TestClient) -> None:
    """A run's audit record is written just after its answer; an action the client takes
    after that answer must still come after the run in the audit log."""
    nox = nox_of(client)
    held = hold_saves(nox)
    held["print('first')"] = threading.Event()
    assert client.post("/run_py", json={"code": "print('first')"}).status_code == 200
    threading.Timer(0.3, held["print('first')"].set).start()  # the writer is slow
    began = time.monotonic()
    upload = client.post("/put", files={"file": ("after.txt", b"x")})
    assert upload.status_code == 201
    assert time.monotonic() - began >= 0.25  # the upload's record waited for the run's
    actions = [e["action"] for e in client.get("/api/audit", params={"limit": 2}).json()["items"]]
    assert actions == ["file.upload", "run"]
