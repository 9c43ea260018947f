"""The server log: a JSON-lines file rotated by size, ``GET /api/logs`` (the tail) and
``GET /api/logs/stream`` (Server-Sent Events) against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient
from tests.conftest import free_port, nox_serve, uvicorn_serving

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.base import Result, RunSpec
from nox_api.engine.fake import FakeSandbox
from nox_api.observability.logging import LOGGERS, JsonFormatter, tail_lines
from nox_api.observability.stream import LogHub
from nox_api.services.tokens import TOKEN_PREFIX
from nox_api.state import Nox

FIELDS = {"time", "level", "logger", "event"}
ACCESS_FIELDS = {"method", "route", "status", "duration_ms", "actor_id"}  # nox.http lines
test_log = logging.getLogger("nox.test")


def _nox(app: Any) -> Nox:
    nox: Nox = app.state.nox
    return nox


def _not_access(lines: list[str]) -> list[str]:
    return [line for line in lines if json.loads(line)["logger"] != "nox.http"]


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the file ------------------------------------------------------------------------------------


def _boom(spec: RunSpec) -> Result:
    raise RuntimeError("boom for the log")


def test_the_log_file_is_json_lines(data_dir: Path, settings: Settings, admin_token: str) -> None:
    app = create_app(settings, sandbox=FakeSandbox(handler=_boom))
    auth = {"Authorization": f"Bearer {admin_token}"}
    with TestClient(app, headers=auth, raise_server_exceptions=False) as c:
        clean = c.post("/api/sandbox/clean", json={"dry_run": True})
        assert clean.status_code == 200
        crash = c.post("/run_py", json={"code": "print(1)"})
        assert crash.status_code == 500
        assert crash.json()["error"]["code"] == "internal"
    path = settings.logs_dir / "nox.log"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.logs_dir.stat().st_mode) == 0o700
    records = _records(path)
    for record in records:
        assert FIELDS <= set(record) <= FIELDS | {"request_id", "exc_info"} | ACCESS_FIELDS
        assert record["time"].endswith("Z")
    cleaned = [r for r in records if r["logger"] == "nox.clean"]
    assert len(cleaned) == 1
    assert cleaned[0]["level"] == "INFO"
    assert cleaned[0]["request_id"] == clean.headers["X-Request-ID"]
    assert cleaned[0]["event"].startswith("sandbox clean (dry run): would remove")
    crashed = [r for r in records if "exc_info" in r]
    assert len(crashed) == 1
    assert crashed[0]["level"] == "ERROR"
    assert crashed[0]["event"] == "unhandled error"
    assert "Traceback" in crashed[0]["exc_info"]
    assert "RuntimeError: boom for the log" in crashed[0]["exc_info"]


def test_secrets_never_reach_the_log(data_dir: Path, admin_token: str) -> None:
    env_token = "env-admin-token-never-logged"
    settings = load_settings(data_dir=data_dir, pool_size=0, api_token=env_token)
    stray = TOKEN_PREFIX + "A" * 43
    with TestClient(
        create_app(settings, sandbox=FakeSandbox()),
        headers={"Authorization": f"Bearer {admin_token}"},
    ) as c:
        assert c.get("/api/me").status_code == 200
        assert c.get("/api/me", headers={"Authorization": f"Bearer {stray}"}).status_code == 401
        assert c.get("/api/me", headers={"Authorization": f"Bearer {env_token}"}).status_code == 200
        test_log.warning("a careless line: %s / %s / Bearer %s", admin_token, env_token, "abc.d")
        try:
            raise ValueError(f"an error naming {stray}")
        except ValueError:
            test_log.exception("a careless traceback")
    text = (settings.logs_dir / "nox.log").read_text()
    for secret in (admin_token, admin_token[len(TOKEN_PREFIX) :], env_token, stray, "abc.d"):
        assert secret not in text
    careless = [r for r in _records(settings.logs_dir / "nox.log") if r["logger"] == "nox.test"]
    assert careless[0]["event"] == (
        "a careless line: nox_[REDACTED] / [REDACTED] / Bearer [REDACTED]"
    )
    assert "an error naming nox_[REDACTED]" in careless[1]["exc_info"]


def test_the_file_rotates_at_its_size(data_dir: Path, admin_token: str) -> None:
    settings = load_settings(data_dir=data_dir, pool_size=0, log_max_bytes=4096, log_backups=2)
    with TestClient(
        create_app(settings, sandbox=FakeSandbox()),
        headers={"Authorization": f"Bearer {admin_token}"},
    ) as c:
        for n in range(200):
            test_log.info("line %04d %s", n, "x" * 100)
        tail = c.get("/api/logs", params={"tail": 50}).json()["lines"]
    folder = settings.logs_dir
    assert sorted(p.name for p in folder.iterdir()) == ["nox.log", "nox.log.1", "nox.log.2"]
    numbers: list[int] = []
    for name in ("nox.log.2", "nox.log.1", "nox.log"):
        path = folder / name
        assert path.stat().st_size <= 4096
        numbers += [int(r["event"].split()[1]) for r in _records(path) if r["logger"] == "nox.test"]
    assert numbers == list(range(numbers[0], 200))  # the newest lines, none lost or reordered
    assert numbers[0] > 100  # the older ones rotated away
    assert [json.loads(line)["event"].split()[1] for line in tail] == [
        f"{n:04d}" for n in range(150, 200)
    ]  # the tail continues into the rotated files


def test_tail_returns_the_last_lines_in_order(client: TestClient, settings: Settings) -> None:
    for n in range(300):
        test_log.info("tail %d", n)
    _nox(client.app).logs.flush()  # lines are written by the log's own thread
    path = settings.logs_dir / "nox.log"
    expected = path.read_text().splitlines()
    lines = client.get("/api/logs", params={"tail": 100}).json()["lines"]
    assert lines == expected[-100:]
    assert json.loads(lines[-1])["event"] == "tail 299"
    default = client.get("/api/logs").json()["lines"]  # 100, the first call's access line too
    assert len(default) == 100
    assert _not_access(default) == expected[-99:]
    assert json.loads(default[-1])["route"] == "/api/logs"
    everything = client.get("/api/logs", params={"tail": 10_000}).json()["lines"]
    assert _not_access(everything) == _not_access(path.read_text().splitlines())
    for bad in (0, -1, 10_001, "x"):
        resp = client.get("/api/logs", params={"tail": bad})
        assert resp.status_code == 422
        assert resp.json()["error"]["code"] == "invalid_request"


def test_tail_reads_from_the_end_of_a_huge_file(data_dir: Path) -> None:
    path = data_dir / "huge.log"
    with path.open("wb") as f:
        f.truncate(64 * 1024**3)  # 64 GiB of hole: reading it all would take minutes
        f.seek(0, os.SEEK_END)
        f.write(b"".join(b'{"n": %d}\n' % n for n in range(1000)))
        f.write(b'{"n": "half written')
    started = time.monotonic()
    lines = tail_lines([path], 100)
    assert time.monotonic() - started < 2
    assert lines == [f'{{"n": {n}}}' for n in range(900, 1000)]


def test_tail_lines_across_blocks_and_files(data_dir: Path) -> None:
    current, older = data_dir / "a.log", data_dir / "a.log.1"
    long = "y" * 150_000  # longer than a read block: spans three of them
    older.write_text("o1\no2\n")
    current.write_text(f"c1\n{long}\n\nc3\nhalf")
    assert tail_lines([current, older], 2) == [long, "c3"]  # empty lines and "half" left out
    assert tail_lines([current, older], 4) == ["o2", "c1", long, "c3"]
    assert tail_lines([current, older, data_dir / "missing"], 100) == ["o1", "o2", "c1", long, "c3"]
    current.write_text("only a line being written")
    assert tail_lines([current], 5) == []
    current.write_bytes(b"")
    assert tail_lines([current, older], 1) == ["o2"]


def test_two_apps_do_not_stack_handlers(settings: Settings, admin_token: str) -> None:
    loggers = [logging.getLogger(name) for name in LOGGERS]
    baseline = [list(logger.handlers) for logger in loggers]
    level = loggers[0].level
    for _ in range(2):
        with TestClient(create_app(settings, sandbox=FakeSandbox())):
            # one hand-off to the log's writer thread (which feeds the file and the stream)
            assert [len(lg.handlers) for lg in loggers] == [len(b) + 1 for b in baseline]
            assert loggers[0].getEffectiveLevel() <= logging.INFO
        assert [list(lg.handlers) for lg in loggers] == baseline
        assert loggers[0].level == level


# --- the stream ----------------------------------------------------------------------------------


def test_a_slow_subscriber_costs_a_bounded_queue_and_hears_of_the_drops() -> None:
    hub = LogHub(capacity=10)
    hub.setFormatter(JsonFormatter())

    def burst(count: int) -> None:
        for n in range(count):
            hub.handle(
                test_log.makeRecord("nox.test", logging.INFO, __file__, 1, "m%d", (n,), None)
            )

    async def scenario() -> list[bytes]:
        events = hub.events()
        chunks = [await anext(events)]
        assert hub.subscribers == 1
        writer = threading.Thread(target=burst, args=(5000,))  # a thread, as a server's logs
        writer.start()
        await asyncio.to_thread(writer.join)
        chunks.append(await anext(events))
        burst(3)
        chunks.append(await anext(events))
        await events.aclose()
        assert hub.subscribers == 0
        return chunks

    connected, flood, after = asyncio.run(scenario())
    assert connected == b": connected\n\n"
    events = flood.decode().split("\n\n")[:-1]
    data = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: ")]
    assert [d["event"] for d in data] == [f"m{n}" for n in range(10)]  # the queue's worth
    assert events[-1] == 'event: dropped\ndata: {"dropped": 4990}'
    later = [json.loads(e.removeprefix("data: ")) for e in after.decode().split("\n\n")[:-1]]
    assert [d["event"] for d in later] == ["m0", "m1", "m2"]  # no drops once it keeps up


def _wait_for(condition: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_stream_over_a_real_server(settings: Settings, admin_token: str) -> None:
    app = create_app(settings, sandbox=FakeSandbox())
    auth = {"Authorization": f"Bearer {admin_token}"}
    with uvicorn_serving(app) as (base, server):
        hub = _nox(app).logs.hub
        hub.keepalive_s = 0.5
        with (
            httpx.Client(base_url=base, headers=auth, timeout=10) as listener,
            listener.stream("GET", "/api/logs/stream") as resp,
        ):
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["cache-control"] == "no-cache"
            lines = resp.iter_lines()
            assert next(lines) == ": connected"
            assert hub.subscribers == 1
            sent = time.monotonic()
            other = httpx.post(f"{base}/api/sandbox/clean", json={"dry_run": True}, headers=auth)
            request_id = other.headers["X-Request-ID"]
            for _ in range(50):
                line = next(lines)
                if line.startswith("data: ") and request_id in line:
                    break
            else:
                pytest.fail("the clean's log line never came")
            assert time.monotonic() - sent < 5
            record = json.loads(line.removeprefix("data: "))
            assert record["logger"] == "nox.clean"
            assert record["request_id"] == request_id
            assert next(lines) == ""  # the event's end
            access = next(lines)  # the clean's own access line follows its answer
            assert json.loads(access.removeprefix("data: "))["route"] == "/api/sandbox/clean"
            assert next(lines) == ""
            keepalive = [next(lines) for _ in range(2)]  # nothing logs meanwhile
            assert keepalive == [": keep-alive", ""]
        # the client went away: its subscription and its task are given back
        assert _wait_for(lambda: hub.subscribers == 0), "the subscription outlived its client"
        assert _wait_for(lambda: not server.server_state.tasks), "a connection task leaked"


def test_a_stream_may_end_after_a_duration(client: TestClient) -> None:
    started = time.monotonic()
    resp = client.get("/api/logs/stream", params={"duration_s": 0.3})
    assert resp.status_code == 200
    assert resp.text.startswith(": connected\n\n")
    assert 0.3 <= time.monotonic() - started < 5
    assert _nox(client.app).logs.hub.subscribers == 0
    assert client.get("/api/logs/stream", params={"duration_s": 0}).status_code == 422


def test_serve_logs_to_stderr_and_the_file_and_ends_streams_on_sigterm(data_dir: Path) -> None:
    """`nox-api serve` for real: its plain-text stderr output stays, the JSON file fills, and
    SIGTERM stops it promptly although a log stream is open."""
    port = free_port()
    token = "serve-test-admin-token"
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    with nox_serve(
        data_dir, port, NOX_POOL_SIZE="0", NOX_API_TOKEN=token,
        NOX_SANDBOX_BACKEND="unsafe",  # no sandbox needed to test the logs
    ) as (proc, output):  # fmt: skip
        with (
            httpx.Client(base_url=base, headers=auth, timeout=10) as c,
            c.stream("GET", "/api/logs/stream") as resp,
        ):
            lines = resp.iter_lines()
            assert next(lines) == ": connected"
            proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            for _line in lines:  # until the server ends the stream
                assert time.monotonic() - stopped < 5, "the stream held the shutdown up"
            assert time.monotonic() - stopped < 5
        proc.wait(timeout=15)
    out = "\n".join(output)
    # uvicorn re-raises the SIGTERM it handled once it has shut down
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "WARNING nox: NOX_SANDBOX_BACKEND=unsafe" in out  # plain text on stderr, as before
    records = _records(data_dir / "logs" / "nox.log")
    messages = [(r["logger"], r["event"]) for r in records]
    assert ("uvicorn.error", "Application startup complete.") in messages
    assert any(logger == "nox" and "WITHOUT ANY ISOLATION" in m for logger, m in messages)
    assert token not in (data_dir / "logs" / "nox.log").read_text()


def test_the_stream_subscribes_when_made_so_no_line_falls_between() -> None:
    """The subscription is taken when the stream is made (before the answer's headers leave):
    a line logged before the first event is read is in the stream. A stream closed without
    ever being read gives its subscription back too."""
    hub = LogHub(capacity=10)
    hub.setFormatter(JsonFormatter())

    async def scenario() -> tuple[bytes, bytes]:
        events = hub.events()
        assert hub.subscribers == 1
        hub.handle(test_log.makeRecord("nox.test", logging.INFO, __file__, 1, "early", (), None))
        first, second = await anext(events), await anext(events)
        await events.aclose()
        assert hub.subscribers == 0
        unread = hub.events()
        assert hub.subscribers == 1
        await unread.aclose()
        assert hub.subscribers == 0
        return first, second

    connected, early = asyncio.run(scenario())
    assert connected == b": connected\n\n"
    assert json.loads(early.decode().removeprefix("data: "))["event"] == "early"
