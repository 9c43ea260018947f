"""The exception tree, each error produced by a real request; retries observed on real
servers; a wrong URL, a wrong token and a dead server are one clear exception each."""

from __future__ import annotations

import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.conftest import free_port

from noxsdk import (
    AuthError,
    ConflictError,
    InsufficientStorageError,
    InvalidRequestError,
    NotFoundError,
    NoxClient,
    NoxConnectionError,
    NoxError,
    NoxTimeoutError,
    PayloadTooLargeError,
    PermissionDenied,
    QuotaExceededError,
    RateLimitedError,
    RetryEvent,
    SandboxUnavailableError,
    ServerError,
)

from ._scripted_http import Answer, ScriptedServer, scripted_server
from .conftest import CODE_BYTES_MAX, Server

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedServer]:
    with scripted_server() as running:
        yield running


@pytest.fixture(scope="module")
def tokens(server: Server) -> dict[str, str]:
    """Tokens of each kind the cases need, made through the SDK."""
    with server.client() as admin:
        return {
            "viewer": admin.create_token("err-viewer", "viewer").token,
            "tiny": admin.create_token("err-tiny", "admin", workspace="tiny").token,
        }


@pytest.fixture
def runner(admin: NoxClient, request: pytest.FixtureRequest) -> str:
    """A new runner token: its rate limit window (1 request per second) is empty."""
    return admin.create_token(f"rl-{request.node.name}"[:128], "runner").token


def clear_error(action: Callable[[], Any], expected: type[NoxError]) -> NoxError:
    """Run ``action``; it must raise exactly ``expected``, whose text is one line and whose
    traceback holds nothing from inside httpx2 or pydantic."""
    with pytest.raises(NoxError) as info:
        action()
    error = info.value
    assert type(error) is expected, repr(error)
    text = str(error)
    assert "\n" not in text
    assert error.message in text
    assert error.code in text
    if error.status is not None:
        assert text.startswith(f"HTTP {error.status} {error.code}: ")
    shown = "".join(traceback.format_exception(error))
    for inner in ("httpx2", "httpcore", "pydantic", "During handling", "direct cause"):
        assert inner not in shown, shown
    return error


def _conflict(client: NoxClient) -> None:
    client.write_file("conflict/keep.txt", b"x")
    client.delete_file("conflict")


# (case, client maker key, action, class, status, code)
CASES: list[tuple[str, str, Callable[[NoxClient], Any], type[NoxError], int, str]] = [
    ("wrong token", "wrong", lambda c: c.me(), AuthError, 401, "unauthorized"),
    ("viewer runs", "viewer", lambda c: c.run_py("1"), PermissionDenied, 403, "forbidden"),
    ("other workspace", "viewer", lambda c: c.history(workspace="x"), PermissionDenied, 403,
     "forbidden"),
    ("no file", "admin", lambda c: c.read_file("missing.txt"), NotFoundError, 404, "not_found"),
    ("no run", "admin", lambda c: c.execution("nope"), NotFoundError, 404, "not_found"),
    ("escape", "admin", lambda c: c.read_file("../etc/passwd"), InvalidRequestError, 400,
     "invalid_path"),
    ("bad limit", "admin", lambda c: c.history(limit=0), InvalidRequestError, 422,
     "invalid_request"),
    ("full folder", "admin", _conflict, ConflictError, 409, "conflict"),
    ("big code", "admin", lambda c: c.run_py("#" * (CODE_BYTES_MAX + 1)), PayloadTooLargeError,
     413, "payload_too_large"),
    ("no runs left", "tiny", lambda c: c.run_py("1"), QuotaExceededError, 429, "quota_exceeded"),
    ("no room left", "tiny", lambda c: c.write_file("f", b"x" * 4096), QuotaExceededError, 507,
     "storage_quota_exceeded"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("who", "action", "expected", "status", "code"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_error_answer_is_its_exception(  # noqa: PLR0917 - the parameters of a case
    server: Server,
    tokens: dict[str, str],
    who: str,
    action: Callable[[NoxClient], Any],
    expected: type[NoxError],
    status: int,
    code: str,
) -> None:
    token = {"admin": server.token, "wrong": "not-a-token", **tokens}[who]
    with server.client(token) as client:
        error = clear_error(lambda: action(client), expected)
    assert (error.status, error.code) == (status, code)
    assert error.request_id
    assert error.message


def test_the_broken_server_s_errors(broken: Server) -> None:
    events: list[RetryEvent] = []
    with broken.client(on_retry=events.append) as client:
        error = clear_error(lambda: client.run_py("print(1)"), SandboxUnavailableError)
        assert (error.status, error.code) == (503, "sandbox_unavailable")
        assert "apt-get install bubblewrap" in error.message  # the fix is in the message
        error = clear_error(lambda: client.create_backup("b"), InsufficientStorageError)
        assert (error.status, error.code) == (507, "insufficient_storage")
        error = clear_error(lambda: client.write_file("big", b"x" * 4096), PayloadTooLargeError)
        assert error.status == 413
        # a failing health report is a result, not an error (the server answers it with 503)
        assert client.health_detailed().status == "fail"
    assert events == []  # none of these is worth another attempt


def test_a_bad_argument_is_refused_before_sending(server: Server) -> None:
    with server.client() as client:
        error = clear_error(lambda: client.run_py("1", env={"1BAD": "x"}), InvalidRequestError)
    assert error.status is None
    assert "env" in error.message


def test_an_answer_that_is_not_nox_is_a_server_error(scripted: ScriptedServer) -> None:
    html = {"Content-Type": "text/html"}
    scripted.script(Answer(502, b"<html><body>Bad gateway</body></html>", html))
    with NoxClient(scripted.url, "t", max_retries=0) as client:
        error = clear_error(client.me, ServerError)
    assert (error.status, error.code) == (502, "unexpected_response")
    assert "text/html" in error.message
    assert "a Nox server?" in error.message
    scripted.script(Answer(200, b"<html>hello</html>", {"Content-Type": "text/html"}))
    with NoxClient(scripted.url, "t") as client:
        error = clear_error(client.health, ServerError)
    assert error.status == 200
    assert "unexpected answer to GET /health" in error.message


# -- retries --


def test_an_idempotent_call_waits_out_a_429_and_succeeds(server: Server, runner: str) -> None:
    """Runner tokens may send 1 request per second: the second call in a row gets 429 with
    Retry-After: 1, waits it out and succeeds on its second attempt."""
    events: list[RetryEvent] = []
    with server.client(runner, on_retry=events.append) as client:
        client.me()
        started = time.monotonic()
        assert client.list_files().path == ""
        waited = time.monotonic() - started
    assert [(e.method, e.path, e.attempt, e.status) for e in events] == [
        ("GET", "/api/files", 1, 429)
    ]
    assert 1.0 <= events[0].delay_s <= 1.2
    assert events[0].reason == "HTTP 429 rate_limited"
    assert waited >= 1.0


def test_a_post_is_never_retried(server: Server, runner: str) -> None:
    events: list[RetryEvent] = []
    with server.client(runner, on_retry=events.append) as client:
        client.me()
        error = clear_error(lambda: client.run_py("print(1)"), RateLimitedError)
    assert events == []
    assert (error.status, error.code) == (429, "rate_limited")
    assert error.retry_after is not None
    assert 1 <= error.retry_after <= 2


def test_a_retry_after_longer_than_the_cap_is_not_waited(server: Server, runner: str) -> None:
    events: list[RetryEvent] = []
    with server.client(runner, on_retry=events.append, backoff_max_s=0.5) as client:
        client.me()
        started = time.monotonic()
        clear_error(client.me, RateLimitedError)
    assert events == []
    assert time.monotonic() - started < 0.5


def test_503_and_dropped_connections_are_retried_on_reads_only(
    scripted: ScriptedServer,
) -> None:
    events: list[RetryEvent] = []
    with NoxClient(scripted.url, "t", on_retry=events.append, backoff_s=0.01) as client:
        scripted.script(
            Answer(503, b"busy", {"Retry-After": "0"}),
            Answer(drop=True),
            Answer.json(200, {"status": "ok", "version": "9"}),
        )
        assert client.health().version == "9"
        assert [e.status for e in events] == [503, None]
        assert events[1].reason.startswith("connection_error: the connection to ")
        assert len(scripted.seen) == 3

        events.clear()
        scripted.script(Answer(drop=True), Answer.json(200, {}))
        clear_error(lambda: client.run_py("print(1)"), NoxConnectionError)
        assert events == []
        assert len(scripted.seen) == 1


def test_retries_stop_after_max_retries(scripted: ScriptedServer) -> None:
    events: list[RetryEvent] = []
    scripted.script(Answer(503, b"down"))
    with NoxClient(scripted.url, "t", on_retry=events.append, backoff_s=0.01) as client:
        error = clear_error(client.health, ServerError)
    assert error.status == 503
    assert [e.attempt for e in events] == [1, 2, 3]
    assert len(scripted.seen) == 4


def test_a_slow_server_is_a_timeout(scripted: ScriptedServer) -> None:
    scripted.script(Answer(200, b'{"status": "ok", "version": "1"}', delay_s=1.0))
    events: list[RetryEvent] = []
    with NoxClient(scripted.url, timeout=0.2, on_retry=events.append) as client:
        started = time.monotonic()
        error = clear_error(client.health, NoxTimeoutError)
    assert time.monotonic() - started < 0.9
    assert "timeout=0.2" in error.message
    assert events == []


# -- the three mistakes a user makes first --


def test_a_wrong_url_is_one_clear_error(scripted: ScriptedServer) -> None:
    error = clear_error(lambda: NoxClient("127.0.0.1:8080"), NoxConnectionError)
    assert "http://HOST:PORT" in error.message
    # a URL that reaches some other web server
    scripted.script(Answer(404, b"<h1>Not Found</h1>", {"Content-Type": "text/html"}))
    with NoxClient(scripted.url, "t") as client:
        error = clear_error(client.me, ServerError)
    assert f"is {scripted.url} a Nox server?" in error.message


def test_a_wrong_token_is_one_clear_error(server: Server) -> None:
    with server.client("wrong-token") as client:
        error = clear_error(client.me, AuthError)
    assert error.message == "unknown, expired or revoked token"
    with NoxClient(server.url) as client:  # no token at all
        error = clear_error(client.me, AuthError)
    assert "pass token= or set NOX_API_TOKEN" in error.message


def test_a_dead_server_is_one_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    events: list[RetryEvent] = []
    with NoxClient(url, "t", on_retry=events.append, backoff_s=0.01) as client:
        error = clear_error(client.health, NoxConnectionError)
    assert error.message == f"could not connect to {url}: Connection refused"
    assert str(error) == f"connection_error: could not connect to {url}: Connection refused"
    assert len(events) == 3  # retried, being a read


def test_what_a_script_prints_for_a_dead_server() -> None:
    """A user's script that does not catch the error ends with one line naming it, and its
    traceback shows no frame of httpx2."""
    url = f"http://127.0.0.1:{free_port()}"
    code = f"import noxsdk; noxsdk.NoxClient({url!r}, 't', max_retries=0).me()"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "noxsdk.errors.NoxConnectionError: connection_error: "
        f"could not connect to {url}: Connection refused"
    )
    assert "httpx2" not in proc.stderr
    assert "httpcore" not in proc.stderr
