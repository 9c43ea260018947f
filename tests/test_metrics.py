"""``GET /metrics``, the access log line, and one request id followed everywhere it goes."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from tests.conftest import error_message, nox_of, write_policy

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.services.tokens import Role
from nox_api.storage.models import WorkspaceStorageRow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient, **kwargs: Any) -> Samples:
    resp = client.get("/metrics", **kwargs)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def from_loopback(client: TestClient) -> TestClient:
    """The same app, asked from 127.0.0.1 (the test client's own address is 'testclient')."""
    return TestClient(client.app, client=("127.0.0.1", 50000))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _labels in samples}


def test_metrics_expose_build_process_pool_and_health(client: TestClient) -> None:
    samples = scrape(from_loopback(client))
    build = [labels for name, labels in samples if name == "nox_build_info"]
    assert len(build) == 1
    assert dict(build[0])["backend"] == "fake"
    assert {
        "process_resident_memory_bytes", "process_open_fds", "nox_pool_ready_sandboxes",
        "nox_pool_misses_total", "nox_stems_ready", "nox_disk_free_bytes",
    } <= names(samples)  # fmt: skip
    for check in ("overall", "database", "sandbox", "disk", "audit", "policy"):
        assert value(samples, "nox_health_status", check=check) == 0.0  # all ok
    assert ("nox_health_status", (("check", "overall"),)) in samples


def test_runs_are_counted_by_kind_and_status_with_their_times(
    client: TestClient, fake: FakeSandbox
) -> None:
    assert client.post("/run_py", json={"code": "print(1)"}).status_code == 200
    assert client.post("/run_sh", json={"cmd": "exit 3"}).status_code == 200
    samples = scrape(from_loopback(client))
    assert value(samples, "nox_runs_total", kind="python", status="ok") == 1
    assert value(samples, "nox_run_duration_seconds_count", kind="python") == 1
    assert value(samples, "nox_run_cpu_seconds_count", kind="python") == 1
    shell = {dict(labels)["status"] for name, labels in samples if name == "nox_runs_total"}
    assert len(shell) == 2  # the shell run's own status is counted apart


def test_http_requests_are_labelled_by_route_template_never_the_raw_path(
    client: TestClient,
) -> None:
    client.get("/api/history/abcdef0123456789")  # 404: no such run
    client.get("/no/such/path/ever")
    client.get("/api/me")
    samples = scrape(from_loopback(client))
    routes = {
        dict(labels)["route"] for name, labels in samples if name == "nox_http_requests_total"
    }
    assert "/api/history/{execution_id}" in routes
    assert "unmatched" in routes
    assert not any("abcdef" in r or "such" in r for r in routes)
    assert (
        value(samples, "nox_http_requests_total", method="GET", route="/api/me", status="200") == 1
    )
    assert (
        value(samples, "nox_http_requests_total", method="GET", route="unmatched", status="404")
        == 1
    )
    count = value(samples, "nox_http_request_duration_seconds_count", method="GET", route="/api/me")
    assert count == 1


def test_refusals_auth_failures_and_audit_events_are_counted(
    data_dir: Path, fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    policy = write_policy(
        data_dir,
        "rate_limits:\n  roles:\n    viewer: 1/minute\nquotas:\n  default:\n    runs_per_day: 1\n",
    )
    settings = load_settings(data_dir=data_dir, pool_size=0, policy_file=policy)
    with TestClient(create_app(settings, sandbox=fake)) as c:
        viewer = {"Authorization": f"Bearer {make_token(Role.VIEWER)}"}
        runner = {"Authorization": f"Bearer {make_token(Role.RUNNER)}"}
        assert c.get("/api/me", headers=viewer).status_code == 200
        assert c.get("/api/me", headers=viewer).status_code == 429
        assert c.post("/run_py", json={"code": "1"}, headers=runner).status_code == 200
        assert c.post("/run_py", json={"code": "1"}, headers=runner).status_code == 429
        assert c.get("/api/me", headers={"Authorization": "Bearer nox_wrong"}).status_code == 401
        samples = scrape(from_loopback(c))
    assert value(samples, "nox_rate_limited_total", role="viewer") == 1
    assert value(samples, "nox_quota_refused_total", role="runner") == 1
    assert value(samples, "nox_auth_failures_total") == 1
    assert value(samples, "nox_audit_events_total", action="run", outcome="ok") == 1
    assert value(samples, "nox_audit_events_total", action="run", outcome="denied") == 1
    assert value(samples, "nox_audit_events_total", action="auth", outcome="failed") == 1


def test_storage_series_are_bounded(data_dir: Path, fake: FakeSandbox) -> None:
    settings = load_settings(data_dir=data_dir, pool_size=0, metrics_max_workspaces=2)
    with TestClient(create_app(settings, sandbox=fake)) as c:
        nox = nox_of(c)
        nox.stats.scanner.close()  # the scanner would rewrite the rows below
        with nox.db.session() as session:
            session.query(WorkspaceStorageRow).delete()
            for name, size in (("big", 3000), ("mid", 2000), ("small", 10), ("tiny", 5)):
                session.add(
                    WorkspaceStorageRow(
                        workspace=name, files=1, bytes=size, scanned_at=datetime.now(UTC)
                    )
                )
        samples = scrape(from_loopback(c))
    stored = {
        dict(labels)["workspace"]: v
        for (name, labels), v in samples.items()
        if name == "nox_workspace_storage_bytes"
    }
    assert stored == {"big": 3000, "mid": 2000, "_other": 15}


def test_access_from_elsewhere_needs_the_scrape_token(data_dir: Path, fake: FakeSandbox) -> None:
    token = "scrape-token-0123456789"
    settings = load_settings(data_dir=data_dir, pool_size=0, metrics_token=SecretStr(token))
    app = create_app(settings, sandbox=fake)
    with TestClient(app, client=("192.0.2.10", 40000)) as far:
        error_message(far.get("/metrics"), 401, "unauthorized")
        error_message(
            far.get("/metrics", headers={"Authorization": "Bearer nope"}), 403, "forbidden"
        )
        scrape(far, headers={"Authorization": f"Bearer {token}"})
    with TestClient(app, client=("127.0.0.1", 40000)) as near:
        scrape(near)  # loopback: open
        # an address that is no IP address (a proxy's made-up value, a test client) is not
        error_message(TestClient(app).get("/metrics"), 401, "unauthorized")


def test_loopback_can_be_closed_and_no_token_means_no_remote_scrape(
    data_dir: Path, fake: FakeSandbox
) -> None:
    closed = load_settings(data_dir=data_dir, pool_size=0, metrics_loopback=False)
    with TestClient(create_app(closed, sandbox=fake), client=("127.0.0.1", 1)) as c:
        error_message(c.get("/metrics"), 401, "unauthorized")
        error_message(
            c.get("/metrics", headers={"Authorization": "Bearer x" * 3}), 403, "forbidden"
        )


@pytest.mark.parametrize("bad", ["short", ""])
def test_a_short_scrape_token_stops_start_up(data_dir: Path, bad: str) -> None:
    from nox_api.config import ConfigError

    with pytest.raises(ConfigError, match="NOX_METRICS_TOKEN"):
        load_settings(data_dir=data_dir, metrics_token=bad)


def _log_records(settings: Settings) -> list[dict[str, Any]]:
    path = settings.logs_dir / "nox.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_request_id_ties_log_line_history_row_audit_line_and_error_answer(
    client: TestClient, settings: Settings, make_token: Callable[..., str]
) -> None:
    rid = "trace-me-42"
    ran = client.post("/run_py", json={"code": "print(1)"}, headers={"X-Request-ID": rid})
    assert ran.status_code == 200
    assert ran.headers["X-Request-ID"] == rid
    run_id = ran.json()["id"]
    # the same id on a request that fails: a viewer may not run code
    viewer = {"Authorization": f"Bearer {make_token(Role.VIEWER)}", "X-Request-ID": rid}
    refused = client.post("/run_py", json={"code": "print(1)"}, headers=viewer)
    error_message(refused, 403, "forbidden")
    assert refused.json()["error"]["request_id"] == rid

    history = client.get(f"/api/history/{run_id}").json()
    assert history["request_id"] == rid
    audit = client.get("/api/audit", params={"action": "run"}).json()["items"]
    assert [e["request_id"] for e in audit if e["details"].get("id") == run_id] == [rid]
    denied = client.get("/api/audit", params={"action": "auth"}).json()["items"]
    assert [e["outcome"] for e in denied if e["request_id"] == rid] == ["denied"]
    with (settings.audit_dir / "audit.jsonl").open() as f:
        assert sum(json.loads(line).get("request_id") == rid for line in f) == 2

    nox_of(client).logs.flush()  # lines are written by the log's own thread
    access = [r for r in _log_records(settings) if r.get("request_id") == rid]
    assert [(r["logger"], r["route"], r["status"]) for r in access] == [
        ("nox.http", "/run_py", 200),
        ("nox.http", "/run_py", 403),
    ]
    assert all(r["duration_ms"] > 0 and r["method"] == "POST" for r in access)
    assert access[0]["actor_id"] != access[1]["actor_id"]  # two tokens, each named by its id


def test_the_log_never_holds_a_token_or_the_code(
    client: TestClient, settings: Settings, make_token: Callable[..., str]
) -> None:
    secret = make_token(Role.RUNNER)
    marker = "print('code-body-marker-7f3a')"
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.post("/run_py", json={"code": marker}, headers=headers).status_code == 200
    client.get("/api/me", headers={"Authorization": f"Bearer {secret}x"})  # a failed auth too
    nox_of(client).logs.flush()
    text = (settings.logs_dir / "nox.log").read_text()
    assert "nox.http" in text  # the requests were logged ...
    assert secret not in text  # ... without the token
    assert "code-body-marker" not in text  # ... or the code


@pytest.mark.parametrize("tty", [True, False])
def test_stderr_is_readable_on_a_terminal_and_plain_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tty: bool
) -> None:
    import logging
    import sys

    from nox_api import cli

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    try:
        cli._log_to_stderr()
        (handler,) = root.handlers
        record = logging.LogRecord(
            "nox.demo", logging.WARNING, __file__, 1, "disk %s", ("low",), None
        )
        line = handler.format(record)
    finally:
        root.handlers[:] = saved
    assert "disk low" in line
    assert "nox.demo" in line
    assert not line.lstrip().startswith("{")  # never the JSON of the file log
    assert ("\x1b[" in line) is tty  # colours on a terminal only
