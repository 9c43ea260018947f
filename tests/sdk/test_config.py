"""Configuration (arguments over NOX_URL / NOX_API_TOKEN over defaults, timeouts, headers) and
the retry policy's arithmetic."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from noxsdk import (
    AsyncNoxClient,
    AuthError,
    NoxClient,
    NoxConnectionError,
    NoxTimeoutError,
    __version__,
)
from noxsdk._retry import RetryPolicy, parse_retry_after

from ._scripted_http import Answer, scripted_server
from .conftest import Server

pytestmark = pytest.mark.sandbox

EXECUTION = {
    "id": "r1",
    "kind": "python",
    "status": "ok",
    "exit_code": 0,
    "stdout": "1\n",
    "duration_ms": 1.0,
    "started_at": "2026-01-01T00:00:00Z",
    "workspace": "default",
    "actor": "t",
}


def test_the_environment_configures_a_client(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOX_URL", server.url + "/")
    monkeypatch.setenv("NOX_API_TOKEN", server.token)
    with NoxClient() as client:
        assert client.url == server.url
        assert client.me().role == "admin"

    async def main() -> str:
        async with AsyncNoxClient() as client:
            return (await client.me()).name

    assert asyncio.run(main()) == "NOX_API_TOKEN"


def test_arguments_win_over_the_environment(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOX_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("NOX_API_TOKEN", server.token)
    with NoxClient(server.url, token="wrong") as client, pytest.raises(AuthError):
        client.me()
    with NoxClient(server.url) as client:  # the token still comes from the environment
        assert client.me().role == "admin"


def test_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NoxClient().url == "http://127.0.0.1:8080"
    with pytest.raises(NoxConnectionError, match="invalid server URL 'ftp://x'"):
        NoxClient("ftp://x")
    monkeypatch.setenv("NOX_URL", "nox.example")
    with pytest.raises(NoxConnectionError, match="it must look like http://HOST:PORT"):
        NoxClient()


def test_what_every_request_carries() -> None:
    with scripted_server() as scripted:
        with NoxClient(scripted.url, "secret", headers={"X-Team": "a"}) as client:
            client.health()
        with NoxClient(scripted.url) as client:
            client.health()
    with_token, without = (seen.headers for seen in scripted.seen)
    assert with_token["Authorization"] == "Bearer secret"
    assert with_token["X-Team"] == "a"
    assert with_token["User-Agent"] == f"noxsdk/{__version__}"
    assert "Authorization" not in without


def test_a_run_waits_for_its_own_timeout_not_the_client_s() -> None:
    """The read timeout of a run is at least its timeout_s plus a margin: a run may take
    longer than the client's usual wait for an answer."""
    with scripted_server() as scripted, NoxClient(scripted.url, "t", timeout=0.2) as client:
        scripted.script(replace(Answer.json(200, EXECUTION), delay_s=0.5))
        assert client.run_py("print(1)", timeout_s=1).stdout == "1\n"
        with pytest.raises(NoxTimeoutError, match=r"POST /run_py .*timeout=0\.2 s"):
            client.run_py("print(1)")  # no timeout_s: the client's timeout


def test_text_is_not_an_upload() -> None:
    with NoxClient("http://127.0.0.1:1") as client:
        with pytest.raises(TypeError, match="binary mode"):
            client.write_file("x", io.StringIO("text"))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not a str"):
            client.put("a string")  # type: ignore[arg-type]


def test_backoff_doubles_with_jitter_and_stops() -> None:
    policy = RetryPolicy(max_retries=4, backoff_s=1.0, backoff_max_s=5.0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0)]:
        delays = {policy.delay(attempt, None) for _ in range(50)}
        assert all(d is not None and ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jitter
    assert policy.delay(5, None) is None
    wait = policy.delay(1, 2.0)
    assert wait is not None
    assert 2.0 <= wait <= 2.2  # Retry-After is honoured
    assert policy.delay(1, 6.0) is None  # longer than the cap: not waited for
    assert RetryPolicy(max_retries=0).delay(1, None) is None


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    seconds = parse_retry_after(later)
    assert seconds is not None
    assert 28 <= seconds <= 30
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now
