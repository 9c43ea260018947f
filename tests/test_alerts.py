"""Alerts without Alertmanager (``NOX_ALERT_WEBHOOKS``): events on health and audit transitions,
delivered by a background thread with retries, to a receiver on 127.0.0.1 that records them."""

from __future__ import annotations

import base64
import json
import logging
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.conftest import free_port, nox_of, serve_refused

from nox_api._version import __version__
from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.errors import ConfigError
from nox_api.services.alerts import AlertHook
from nox_api.services.health import Check, HealthService
from nox_api.state import Nox
from noxsdk.models import HealthStatus

MIB = 1024 * 1024
CHECKS = {"database", "sandbox", "disk", "audit", "policy"}
EVENT_KEYS = {"source", "event", "status", "at", "server", "version", "checks", "failing"}
QUIET_S = 0.3  # how long "no further request" is watched for


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours proxy variables: the events must go straight to 127.0.0.1."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


# --- the receiver --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.body)
        return event


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        assert isinstance(self.server, _Server)
        status = self.server.receiver.record(self.path, dict(self.headers.items()), body)
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Receiver:
    """Records each POST and answers the next of ``answers`` (200 when none is left)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.answers: deque[int] = deque()
        self._cond = threading.Condition()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.receiver = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def record(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._cond:
            self.requests.append(Received(path, headers, body))
            self._cond.notify_all()
            return self.answers.popleft() if self.answers else 200

    def wait_for(self, count: int, timeout_s: float = 5.0) -> list[Received]:
        """The first ``count`` requests, once they came (fails after ``timeout_s``)."""
        with self._cond:
            arrived = self._cond.wait_for(lambda: len(self.requests) >= count, timeout_s)
            assert arrived, f"{len(self.requests)} of {count} requests came in {timeout_s} s"
            return list(self.requests[:count])

    def events(self) -> list[dict[str, Any]]:
        with self._cond:
            return [r.event for r in self.requests]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    rec.start()
    yield rec
    rec.stop()


# --- helpers -------------------------------------------------------------------------------------


@contextmanager
def _server(
    data_dir: Path, token: str, fake: FakeSandbox, webhooks: str, **settings: Any
) -> Iterator[TestClient]:
    options: dict[str, Any] = {"alert_interval_s": 3600.0, **settings}
    config = load_settings(data_dir=data_dir, pool_size=0, alert_webhooks=webhooks, **options)
    app = create_app(config, sandbox=fake)
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


def _status(c: TestClient) -> str:
    resp = c.get("/api/health/detailed")
    assert resp.status_code in (200, 503), resp.text
    status: str = resp.json()["status"]
    assert (resp.status_code == 503) == (status == "fail")
    return status


def _fail_disk(nox: Nox) -> None:
    """Make the disk check fail: ask for far more free space than the disk has."""
    free_mib = shutil.disk_usage(nox.settings.data_path).free // MIB
    nox.settings.disk_free_min_mib = (free_mib + 1) * 100


def _quiet(receiver: Receiver, count: int) -> None:
    """Still exactly ``count`` requests a moment later."""
    time.sleep(QUIET_S)
    assert len(receiver.requests) == count, receiver.events()


def _assert_shape(event: dict[str, Any], name: str, status: str) -> None:
    assert set(event) >= EVENT_KEYS, event
    assert (event["source"], event["event"], event["status"]) == ("nox", name, status)
    assert (event["server"], event["version"]) == (socket.gethostname(), __version__)
    at = datetime.fromisoformat(event["at"])
    assert at.utcoffset() is not None
    assert at.utcoffset() == datetime.now(UTC).utcoffset()
    assert abs((datetime.now(UTC) - at).total_seconds()) < 60
    assert set(event["checks"]) == CHECKS
    for check in event["checks"].values():
        assert set(check) == {"status", "detail"}
        assert check["status"] in ("ok", "degraded", "fail")
        assert check["detail"]
    failing = [n for n, c in event["checks"].items() if c["status"] == "fail"]
    assert event["failing"] == failing


def _audited(c: TestClient, count: int = 2) -> None:
    for n in range(count):
        resp = c.post("/api/tokens", json={"name": f"audited-{n}", "role": "viewer"})
        assert resp.status_code == 201


# --- transitions ---------------------------------------------------------------------------------


def test_health_turning_fail_sends_one_event(
    data_dir: Path, admin_token: str, fake: FakeSandbox, receiver: Receiver
) -> None:
    with _server(data_dir, admin_token, fake, receiver.url) as c:
        assert _status(c) == "ok"
        _fail_disk(nox_of(c))
        started = time.monotonic()
        for _ in range(3):
            assert _status(c) == "fail"
        assert time.monotonic() - started < 2
        [sent] = receiver.wait_for(1)
        _quiet(receiver, 1)  # a failure that goes on is not sent again
    assert sent.path == "/hook"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["User-Agent"] == f"nox/{__version__}"
    event = sent.event
    _assert_shape(event, "health_failed", "fail")
    assert event["previous"] == "ok"
    assert event["failing"] == ["disk"]
    assert "NOX_DISK_FREE_MIN_MIB" in event["checks"]["disk"]["detail"]
    assert "detail" not in event


def test_recovery_sends_health_recovered_once(
    data_dir: Path, admin_token: str, fake: FakeSandbox, receiver: Receiver
) -> None:
    free_mib = shutil.disk_usage(data_dir).free // MIB
    huge = (free_mib + 1) * 100
    with _server(data_dir, admin_token, fake, receiver.url, disk_free_min_mib=huge) as c:
        nox = nox_of(c)
        assert _status(c) == "fail"  # failing from the first report on: sent too
        receiver.wait_for(1)
        nox.settings.disk_free_min_mib = 0
        assert _status(c) == "ok"
        assert _status(c) == "ok"
        first, recovered = (r.event for r in receiver.wait_for(2))
        _quiet(receiver, 2)
    assert (first["event"], first["previous"]) == ("health_failed", None)
    _assert_shape(recovered, "health_recovered", "ok")
    assert (recovered["previous"], recovered["failing"]) == ("fail", [])


def test_a_broken_audit_chain_sends_audit_broken_once_per_break(
    data_dir: Path, admin_token: str, fake: FakeSandbox, receiver: Receiver
) -> None:
    with _server(data_dir, admin_token, fake, receiver.url) as c:
        log_file = nox_of(c).settings.audit_dir / "audit.jsonl"
        _audited(c)
        assert _status(c) == "ok"
        log_file.unlink()
        assert _status(c) == "fail"
        assert _status(c) == "fail"
        failed, broken = (r.event for r in receiver.wait_for(2))
        _quiet(receiver, 2)
        _audited(c, 1)  # the chain goes on from its checkpoint: the tail verifies again
        assert _status(c) == "ok"
        receiver.wait_for(3)
        log_file.unlink()  # a second break
        assert _status(c) == "fail"
        events = [r.event["event"] for r in receiver.wait_for(5)]
        _quiet(receiver, 5)
    _assert_shape(failed, "health_failed", "fail")
    assert failed["failing"] == ["audit"]
    _assert_shape(broken, "audit_broken", "fail")
    assert broken["failing"] == ["audit"]
    assert "empty but its checkpoint records" in broken["detail"]
    assert broken["detail"] == broken["checks"]["audit"]["detail"]
    assert events == [
        "health_failed",
        "audit_broken",
        "health_recovered",
        "health_failed",
        "audit_broken",
    ]


def test_the_monitor_notices_a_failure_without_any_request(
    data_dir: Path, admin_token: str, fake: FakeSandbox, receiver: Receiver
) -> None:
    with _server(data_dir, admin_token, fake, receiver.url, alert_interval_s=0.1) as c:
        nox = nox_of(c)
        monitor = nox.alert_monitor
        assert monitor is not None
        assert monitor.running
        _fail_disk(nox)
        [sent] = receiver.wait_for(1)
        assert sent.event["event"] == "health_failed"
    assert not monitor.running  # stopped by Nox.close


@dataclass(frozen=True)
class _Check:
    status: HealthStatus
    detail: str = "why"


def _checks(**failing: HealthStatus) -> dict[str, _Check]:
    return {name: _Check(failing.get(name, HealthStatus.OK)) for name in sorted(CHECKS)}


def test_only_transitions_are_sent(receiver: Receiver) -> None:
    ok, degraded, fail = HealthStatus.OK, HealthStatus.DEGRADED, HealthStatus.FAIL
    hook = AlertHook([receiver.url], backoff_s=0.01)
    steps = [
        (ok, _checks()),
        (degraded, _checks(sandbox=degraded)),
        (fail, _checks(disk=fail)),
        (fail, _checks(disk=fail)),
        (degraded, _checks(sandbox=degraded)),
        (fail, _checks(audit=fail)),
        (fail, _checks(audit=fail, disk=fail)),
        (fail, _checks(disk=fail)),  # the audit log repaired while the disk is full
        (fail, _checks(audit=fail)),  # and broken again
    ]
    for status, checks in steps:
        hook.observe(status, checks)
    hook.start()
    try:
        sent = [r.event for r in receiver.wait_for(5)]
        _quiet(receiver, 5)
    finally:
        hook.close()
    assert [(e["event"], e["status"], e.get("previous")) for e in sent] == [
        ("health_failed", "fail", "degraded"),
        ("health_recovered", "degraded", "fail"),
        ("health_failed", "fail", "degraded"),
        ("audit_broken", "fail", None),
        ("audit_broken", "fail", None),
    ]
    assert [e["failing"] for e in sent] == [["disk"], [], ["audit"], ["audit"], ["audit"]]


def test_a_report_overtaken_by_a_newer_one_is_not_taken_in(
    client: TestClient, fake: FakeSandbox, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two reports at once: the one that began first and ends last must not undo the newer
    one's outcome (it would send a false health_recovered)."""
    nox = nox_of(client)
    hook = AlertHook([receiver.url], backoff_s=0.01)
    health = HealthService(nox.settings, nox.db, fake, nox.auditor.log, nox.policy, alerts=hook)
    calls = iter(range(1000))
    entered, gate = threading.Event(), threading.Event()

    def disk() -> Check:
        if next(calls) == 0:
            entered.set()
            assert gate.wait(5)
            return Check(HealthStatus.OK, "plenty")
        return Check(HealthStatus.FAIL, "full")

    monkeypatch.setattr(health, "disk", disk)
    hook.start()
    try:
        older = threading.Thread(target=health.report)
        older.start()
        assert entered.wait(5)  # the older report is under way, its disk check held
        assert health.report().status == HealthStatus.FAIL
        gate.set()
        older.join(5)
        assert not older.is_alive()
        assert health.report().status == HealthStatus.FAIL
        [sent] = receiver.wait_for(1)
        _quiet(receiver, 1)
    finally:
        gate.set()
        hook.close()
    assert sent.event["event"] == "health_failed"


def test_without_webhooks_there_is_no_hook_and_no_monitor(client: TestClient) -> None:
    nox = nox_of(client)
    assert (nox.alerts, nox.alert_monitor, nox.health.alerts) == (None, None, None)
    assert not any(t.name.startswith("nox-alert") for t in threading.enumerate())


# --- delivery ------------------------------------------------------------------------------------


@contextmanager
def _hook(urls: list[str], **options: Any) -> Iterator[AlertHook]:
    hook = AlertHook(urls, **{"timeout_s": 2.0, "backoff_s": 0.01, **options})
    hook.start()
    try:
        yield hook
    finally:
        hook.close()


def test_5xx_is_retried_with_backoff_until_delivered(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.answers.extend([500, 503])
    caplog.set_level(logging.INFO, logger="nox.alerts")
    with _hook([receiver.url], retries=3) as hook:
        hook.notify({"event": "test", "n": 1})
        sent = receiver.wait_for(3)
        _quiet(receiver, 3)
    assert [r.event for r in sent] == [{"event": "test", "n": 1}] * 3
    messages = [r.getMessage() for r in caplog.records if r.name == "nox.alerts"]
    assert sum("HTTP 500" in m and "retrying" in m for m in messages) == 1
    assert sum("HTTP 503" in m and "retrying" in m for m in messages) == 1
    assert any("delivered" in m and "attempt 3 of 4" in m for m in messages), messages


def test_retries_end_after_the_configured_count(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.answers.extend([500] * 10)
    with _hook([receiver.url], retries=2) as hook:
        hook.notify({"event": "test"})
        receiver.wait_for(3)
        _quiet(receiver, 3)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("attempt 3 of 3; giving up" in m for m in errors), errors


@pytest.mark.parametrize(("answer", "why"), [(400, "HTTP 400"), (302, "redirects are not")])
def test_4xx_and_redirects_are_not_retried(
    receiver: Receiver, caplog: pytest.LogCaptureFixture, answer: int, why: str
) -> None:
    receiver.answers.append(answer)
    with _hook([receiver.url], retries=3) as hook:
        hook.notify({"event": "test"})
        receiver.wait_for(1)
        _quiet(receiver, 1)
    assert [r.path for r in receiver.requests] == ["/hook"]  # /elsewhere never asked
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(why in m and "not retried" in m for m in errors), errors


def test_an_unreachable_webhook_blocks_no_request_and_its_secrets_stay_out_of_the_log(
    data_dir: Path, admin_token: str, fake: FakeSandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """One URL refuses connections, the other accepts them and never answers: the health
    request still answers at once, and the failures are logged without userinfo, path or query."""
    closed_port = free_port()
    unreachable = f"http://nox:hunter2@127.0.0.1:{closed_port}/hook/abc?token=s3cr3t-query"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        hanging = f"http://127.0.0.1:{port}/hanging/xyz?key=other-s3cr3t"
        caplog.set_level(logging.INFO, logger="nox.alerts")
        with _server(
            data_dir, admin_token, fake, f"{unreachable},{hanging}", alert_timeout_s=1.0
        ) as c:
            nox = nox_of(c)
            _fail_disk(nox)
            started = time.monotonic()
            assert _status(c) == "fail"
            assert time.monotonic() - started < 0.5  # the request only queued the event
            deadline = time.monotonic() + 5
            while not any("webhook #2" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the hanging webhook's timeout was not logged"
                time.sleep(0.05)
        log_text = nox.settings.logs_dir.joinpath("nox.log").read_text()
    messages = [r.getMessage() for r in caplog.records if r.name == "nox.alerts"]
    first = next(m for m in messages if "webhook #1" in m)
    assert first.startswith(
        f"alert health_failed to webhook #1 (http://127.0.0.1:{closed_port}/...)"
    )
    assert "ConnectionRefusedError" in first
    assert any("webhook #2" in m and "timed out" in m for m in messages), messages
    for secret in ("hunter2", "nox:", "s3cr3t", "token=", "/hook/abc", "/hanging/xyz"):
        assert not any(secret in m for m in messages), secret
        assert secret not in log_text, secret


def test_a_full_queue_drops_the_oldest_and_never_blocks(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    hook = AlertHook([receiver.url], backoff_s=0.01, queue_size=3)  # not started: nothing leaves
    started = time.monotonic()
    for n in range(50):
        hook.notify({"event": f"e{n}"})
    assert time.monotonic() - started < 1
    assert hook.pending() == 3
    full = [r for r in caplog.records if "is full" in r.getMessage()]
    assert len(full) == 47
    assert all(r.levelno == logging.WARNING for r in full)
    hook.notify({"event": "not JSON", "value": object()})  # logged, never raised
    hook.start()
    try:
        sent = receiver.wait_for(3)
        _quiet(receiver, 3)
    finally:
        hook.close()
    assert [r.event["event"] for r in sent] == ["e47", "e48", "e49"]
    hook.notify({"event": "after close"})  # dropped, never raised
    assert hook.pending() == 0


def test_close_delivers_what_is_queued(receiver: Receiver) -> None:
    hook = AlertHook([receiver.url], backoff_s=0.01)
    for n in range(5):
        hook.notify({"event": f"e{n}"})
    hook.start()
    started = time.monotonic()
    hook.close()
    assert time.monotonic() - started < 5
    assert [e["event"] for e in receiver.events()] == [f"e{n}" for n in range(5)]


def test_close_stops_retrying_and_is_bounded(receiver: Receiver) -> None:
    """A delivery waiting to retry gets one last attempt at close, not its whole backoff."""
    receiver.answers.extend([500] * 10)
    hook = AlertHook([receiver.url], backoff_s=30.0, retries=5)
    hook.start()
    hook.notify({"event": "e"})
    receiver.wait_for(1)
    started = time.monotonic()
    hook.close(timeout_s=2.0)
    assert time.monotonic() - started < 2
    assert len(receiver.wait_for(2)) == 2  # the last attempt
    assert hook.pending() == 0


def test_userinfo_is_sent_as_basic_auth(receiver: Receiver) -> None:
    url = receiver.url.replace("http://", "http://nox%40ops:p%3Ass@")
    with _hook([url]) as hook:
        hook.notify({"event": "test"})
        [sent] = receiver.wait_for(1)
    expected = base64.b64encode(b"nox@ops:p:ss").decode()
    assert sent.headers["Authorization"] == f"Basic {expected}"


def test_an_alert_hook_takes_only_http_urls() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        AlertHook(["file:///etc/passwd"])


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("ftp://127.0.0.1/secret-path", "entry 1 is not an http:// or https:// URL with a host"),
        ("http://127.0.0.1/ok,https:///secret-path", "entry 2 is not an http:// or https://"),
        ("secret-path", "entry 1 is not an http:// or https://"),
        ("http://127.0.0.1:99999/secret-path", "entry 1 has an invalid port"),
        ("http://127.0.0.1/secret path", "entry 1 holds a space or a control character"),
    ],
)
def test_a_bad_webhook_url_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, value: str, fragment: str
) -> None:
    monkeypatch.setenv("NOX_ALERT_WEBHOOKS", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = info.value.message
    assert message.startswith("NOX_ALERT_WEBHOOKS: ")
    assert fragment in message
    assert "secret" not in message  # a webhook URL may hold one: never repeated
    assert "\n" not in message


def test_webhook_settings_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOX_ALERT_WEBHOOKS", " http://127.0.0.1:9/a , https://127.0.0.1/b?x=1 ,")
    settings: Settings = load_settings()
    assert settings.alert_webhooks == ("http://127.0.0.1:9/a", "https://127.0.0.1/b?x=1")
    assert (settings.alert_interval_s, settings.alert_timeout_s, settings.alert_retries) == (
        30.0,
        5.0,
        3,
    )
    assert load_settings(alert_webhooks="").alert_webhooks == ()


def test_serve_with_a_bad_webhook_exits_2_with_one_line(tmp_path: Path) -> None:
    assert serve_refused(tmp_path, NOX_ALERT_WEBHOOKS="ftp://nox:secret@127.0.0.1/x") == (
        2,
        [
            "nox-api: configuration error: NOX_ALERT_WEBHOOKS: entry 1 is not an http:// or "
            "https:// URL with a host"
        ],
    )
