"""``GET /api/health/detailed``: each check's ok and failing states, on real parts (the real
bubblewrap lookup, a real SQLite file, the real audit log, a real policy file and disk)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx2 import Response
from tests.conftest import nox_of, write_policy

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.services.audit import AuditEvent, AuditLog, MemoryCheckpointStore
from nox_api.services.auditing import audit_key
from nox_api.services.tokens import Role

MIB = 1024 * 1024
CHECKS = {"database", "sandbox", "disk", "audit", "policy"}


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _health(c: TestClient, status: int = 200, **kwargs: Any) -> dict[str, Any]:
    resp: Response = c.get("/api/health/detailed", **kwargs)
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"status", "checks"}
    assert set(body["checks"]) == CHECKS
    for name, check in body["checks"].items():
        assert check["status"] in ("ok", "degraded", "fail"), name
        assert isinstance(check["detail"], str), name
        assert check["detail"], name
    return body


def _only_failing(body: dict[str, Any]) -> dict[str, str]:
    return {name: c["status"] for name, c in body["checks"].items() if c["status"] != "ok"}


@contextmanager
def _app(settings: Settings, token: str, **kwargs: Any) -> Iterator[TestClient]:
    with TestClient(create_app(settings, **kwargs), headers=_auth(token)) as c:
        yield c


# --- all well ------------------------------------------------------------------------------------


def test_a_fresh_server_is_ok_in_every_check(client: TestClient, settings: Settings) -> None:
    assert client.post("/api/tokens", json={"name": "h", "role": "viewer"}).status_code == 201
    body = _health(client)
    assert body["status"] == "ok"
    assert _only_failing(body) == {}
    checks = body["checks"]
    assert checks["database"]["revision"] == checks["database"]["head"]
    assert checks["database"]["head"] == nox_of(client).db.head()
    assert (checks["sandbox"]["backend"], checks["sandbox"]["isolation"]) == ("fake", "fake")
    usage = shutil.disk_usage(settings.data_path)
    assert abs(checks["disk"]["free_mib"] - usage.free // MIB) < 1024
    assert checks["disk"]["total_mib"] == usage.total // MIB
    assert checks["disk"]["min_free_mib"] == settings.disk_free_min_mib
    audited = len(nox_of(client).auditor.log.query(1000))
    assert audited >= 1
    assert checks["audit"]["entries"] == audited
    assert checks["audit"]["checkpoint"] == audited
    assert checks["policy"]["source"] == settings.policy_path.name
    assert checks["policy"]["sha256"] == nox_of(client).policy.source_sha256


def test_a_viewer_may_read_it(client: TestClient, make_token: Callable[..., str]) -> None:
    body = _health(client, headers=_auth(make_token(Role.VIEWER)))
    assert body["status"] == "ok"


# --- sandbox -------------------------------------------------------------------------------------


def test_missing_bubblewrap_fails_the_sandbox_check(
    data_dir: Path, admin_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real start-up path: BwrapLauncher.create looks bwrap up on PATH and finds none."""
    empty = data_dir / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("bwrap") is None
    settings = load_settings(data_dir=data_dir, pool_size=0)  # the default backend: bwrap
    with _app(settings, admin_token) as c:
        body = _health(c, 503)
        assert body["status"] == "fail"
        assert _only_failing(body) == {"sandbox": "fail"}
        sandbox = body["checks"]["sandbox"]
        assert sandbox["backend"] == "bwrap"
        assert sandbox["detail"].startswith("bubblewrap is not installed")
        assert "apt-get install bubblewrap" in sandbox["detail"]
        run = c.post("/run_py", json={"code": "print(1)"})
        assert run.status_code == 503
        assert run.json()["error"]["code"] == "sandbox_unavailable"


@pytest.mark.sandbox
def test_the_real_sandbox_is_probed_at_most_once_per_interval(
    bwrap_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = nox_of(bwrap_client).sandbox
    real_probe = sandbox.probe
    probes: list[str | None] = []

    def counting_probe() -> str | None:
        probes.append(real_probe())
        return probes[-1]

    monkeypatch.setattr(sandbox, "probe", counting_probe)
    first = _health(bwrap_client)["checks"]["sandbox"]
    assert first["status"] == "ok", first
    assert (first["backend"], first["isolation"]) == ("bwrap", "namespaces+seccomp")
    assert first["probe_ms"] > 0
    for _ in range(5):
        again = _health(bwrap_client)["checks"]["sandbox"]
        assert again["probe_ms"] == first["probe_ms"]  # the same probe's result
        assert again["probe_age_s"] >= first["probe_age_s"]
    assert probes == [None]  # one probe for six calls
    assert list(nox_of(bwrap_client).settings.probe_dir.iterdir()) == []  # it cleaned up


def test_the_unsafe_backend_is_degraded(data_dir: Path, admin_token: str) -> None:
    settings = load_settings(data_dir=data_dir, pool_size=0, sandbox_backend="unsafe")
    with _app(settings, admin_token) as c:
        body = _health(c)  # degraded still answers 200
        assert body["status"] == "degraded"
        assert _only_failing(body) == {"sandbox": "degraded"}
        sandbox = body["checks"]["sandbox"]
        assert (sandbox["backend"], sandbox["isolation"]) == ("unsafe", "none")
        assert "WITHOUT ISOLATION" in sandbox["detail"]


def test_a_sandbox_that_stops_working_fails_at_the_next_probe(
    data_dir: Path, admin_token: str, fake: FakeSandbox
) -> None:
    settings = load_settings(data_dir=data_dir, pool_size=0)
    with _app(settings, admin_token, sandbox=fake) as c:
        nox = nox_of(c)
        nox.health = type(nox.health)(
            settings, nox.db, fake, nox.auditor.log, nox.policy, probe_interval_s=0
        )
        assert _health(c)["status"] == "ok"
        fake.unavailable = "the test took the sandbox away"
        body = _health(c, 503)
        assert body["checks"]["sandbox"]["detail"] == "the test took the sandbox away"
        fake.unavailable = None
        assert _health(c)["status"] == "ok"


# --- disk ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [(2, "degraded", 200), (100, "fail", 503)])
def test_low_disk_space_degrades_then_fails(
    data_dir: Path, admin_token: str, fake: FakeSandbox, case: tuple[int, str, int]
) -> None:
    factor, status, http = case
    free_mib = shutil.disk_usage(data_dir).free // MIB
    settings = load_settings(data_dir=data_dir, pool_size=0, disk_free_min_mib=free_mib * factor)
    with _app(settings, admin_token, sandbox=fake) as c:
        body = _health(c, http)
        assert body["status"] == status
        assert _only_failing(body) == {"disk": status}
        disk = body["checks"]["disk"]
        assert disk["min_free_mib"] == free_mib * factor
        assert "NOX_DISK_FREE_MIN_MIB" in disk["detail"]


# --- audit ---------------------------------------------------------------------------------------


def _audited(client: TestClient, count: int = 3) -> Path:
    for n in range(count):
        resp = client.post("/api/tokens", json={"name": f"audited-{n}", "role": "viewer"})
        assert resp.status_code == 201
    return nox_of(client).settings.audit_dir / "audit.jsonl"


def test_an_edited_last_line_fails_the_audit_check(client: TestClient) -> None:
    log_file = _audited(client)
    assert _health(client)["checks"]["audit"]["status"] == "ok"
    data = log_file.read_bytes()
    head, last = data[:-1].rsplit(b"\n", 1)
    assert b'"name":"audited-2"' in last
    log_file.write_bytes(head + b"\n" + last.replace(b"audited-2", b"audited-X") + b"\n")
    body = _health(client, 503)
    assert _only_failing(body) == {"audit": "fail"}
    assert body["checks"]["audit"]["detail"].startswith("edited: the last line")
    assert client.get("/api/audit/verify").json()["ok"] is False  # the full check agrees


def test_a_cut_tail_fails_the_audit_check(client: TestClient) -> None:
    log_file = _audited(client)
    entries = _health(client)["checks"]["audit"]["entries"]
    data = log_file.read_bytes()
    log_file.write_bytes(data[: data[:-1].rfind(b"\n") + 1])  # the last line removed
    audit = _health(client, 503)["checks"]["audit"]
    assert audit["detail"].startswith(f"truncated: the checkpoint records {entries} entries")
    assert (audit["entries"], audit["checkpoint"]) == (entries - 1, entries)


def test_a_half_written_last_line_fails_the_audit_check(client: TestClient) -> None:
    log_file = _audited(client)
    log_file.write_bytes(log_file.read_bytes()[:-20])
    assert "incomplete" in _health(client, 503)["checks"]["audit"]["detail"]


def test_a_tail_rewritten_with_the_key_fails_against_the_checkpoint(
    client: TestClient, settings: Settings
) -> None:
    """Whoever holds the key can write lines that verify; the checkpoint outside the log still
    says the line with that seq was another one."""
    log_file = _audited(client)
    data = log_file.read_bytes()
    log_file.write_bytes(data[: data[:-1].rfind(b"\n") + 1])
    forger = AuditLog(settings.audit_dir, audit_key(settings), MemoryCheckpointStore(), fsync=False)
    with forger:
        forger.append(AuditEvent(action="token.create", outcome="ok", target="forged"))
    audit = _health(client, 503)["checks"]["audit"]
    assert audit["detail"].startswith("truncated: the line with seq")
    assert audit["entries"] == audit["checkpoint"]


def test_a_deleted_audit_log_fails_the_audit_check(client: TestClient) -> None:
    log_file = _audited(client)
    log_file.unlink()
    audit = _health(client, 503)["checks"]["audit"]
    assert "empty but its checkpoint records" in audit["detail"]


# --- policy --------------------------------------------------------------------------------------


def _policy_app(
    data_dir: Path, token: str, fake: FakeSandbox
) -> tuple[Callable[[], Iterator[TestClient]], Path]:
    policy = write_policy(data_dir, "limits:\n  defaults:\n    timeout_s: 5\n")
    settings = load_settings(data_dir=data_dir, pool_size=0, policy_file=policy)

    @contextmanager
    def start() -> Iterator[TestClient]:
        with _app(settings, token, sandbox=fake) as c:
            yield c

    return start, policy


def test_a_refused_policy_reload_degrades_the_policy_check(
    data_dir: Path, admin_token: str, fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    start, policy = _policy_app(data_dir, admin_token, fake)
    with start() as c:
        sha = _health(c)["checks"]["policy"]["sha256"]
        policy.write_text("limits:\n  defaults:\n    timeout_s: -1\n    bogus: 1\n")
        assert c.post("/api/policy/reload").status_code == 400
        body = _health(c)
        assert body["status"] == "degraded"
        assert _only_failing(body) == {"policy": "degraded"}
        check = body["checks"]["policy"]
        assert check["sha256"] == sha  # the old policy stays in force
        assert "bogus" in check["errors"]
        assert "refused" in check["detail"]
        assert "2 problems" in check["detail"]
        viewer = _health(c, headers=_auth(make_token(Role.VIEWER)))["checks"]["policy"]
        assert viewer["status"] == "degraded"
        assert "errors" not in viewer  # the policy's contents are for admins
        policy.write_text("limits:\n  defaults:\n    timeout_s: 6\n")
        assert c.post("/api/policy/reload").status_code == 200
        check = _health(c)["checks"]["policy"]
        assert check["status"] == "ok"
        assert check["sha256"] != sha


def test_an_invalid_file_seen_by_the_watcher_degrades_the_policy_check(
    data_dir: Path, admin_token: str, fake: FakeSandbox
) -> None:
    start, policy = _policy_app(data_dir, admin_token, fake)
    with start() as c:
        assert _health(c)["checks"]["policy"]["status"] == "ok"
        policy.write_text("limits: [this is not a mapping\n")
        deadline = time.monotonic() + 10
        while _health(c)["checks"]["policy"]["status"] == "ok":
            assert time.monotonic() < deadline, "the watcher never refused the file"
            time.sleep(0.1)
        assert _health(c)["checks"]["policy"]["status"] == "degraded"


# --- database ------------------------------------------------------------------------------------


def test_an_unmigrated_database_fails_the_database_check(client: TestClient) -> None:
    nox = nox_of(client)
    head = nox.db.head()
    with nox.db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0001'")
    check = _health(client, 503)["checks"]["database"]
    assert (check["status"], check["revision"], check["head"]) == ("fail", "0001", head)
    assert f"needs {head}" in check["detail"]
    with nox.db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE alembic_version")
    check = _health(client, 503)["checks"]["database"]
    assert check["revision"] is None
    assert "no schema revision" in check["detail"]
    with nox.db.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES (?)", (head,))
    assert _health(client)["status"] == "ok"


def test_a_deleted_database_file_fails_the_database_check(
    data_dir: Path, fake: FakeSandbox
) -> None:
    """The database file replaced by an empty one under a running server (NOX_API_TOKEN lets the
    request authenticate without the database)."""
    settings = load_settings(data_dir=data_dir, pool_size=0, api_token="env-token-for-health-test")
    with _app(settings, "env-token-for-health-test", sandbox=fake) as c:
        nox = nox_of(c)
        assert _health(c)["status"] == "ok"
        aside = data_dir / "aside"
        aside.mkdir()
        nox.db.engine.dispose()
        files = [p for p in data_dir.iterdir() if p.name.startswith("nox.db")]
        for path in files:
            path.rename(aside / path.name)
        try:
            body = _health(c, 503)
            assert body["checks"]["database"]["status"] == "fail"
            assert "no schema revision" in body["checks"]["database"]["detail"]
        finally:
            nox.db.engine.dispose()
            for path in data_dir.iterdir():
                if path.name.startswith("nox.db"):
                    path.unlink()
            for path in files:
                (aside / path.name).rename(path)
        assert _health(c)["status"] == "ok"


def test_a_status_change_is_logged_once(client: TestClient, settings: Settings) -> None:
    log_file = settings.logs_dir / "nox.log"

    def log_file_lines() -> list[str]:
        nox_of(client).logs.flush()  # lines are written by the log's own thread
        return log_file.read_text().splitlines()

    _audited(client, 1)
    _health(client)
    before = len([ln for ln in log_file_lines() if "health is" in ln])
    (settings.audit_dir / "audit.jsonl").unlink()
    for _ in range(3):
        _health(client, 503)
    lines = [ln for ln in log_file_lines() if "health is" in ln]
    assert len(lines) == before + 1
    assert '"level": "WARNING"' in lines[-1]
    assert "health is fail: audit fail" in lines[-1]
