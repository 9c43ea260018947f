"""Behind a reverse proxy: with ``NOX_TRUSTED_PROXIES``, the client address (failed-login limit,
audit log, access log) comes from ``X-Forwarded-For`` when the connection comes from a trusted
proxy; without it, the header is ignored. Real ``nox-api serve`` processes on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx
import pytest
from tests.conftest import free_port, nox_serve, write_policy

from nox_api.config import ConfigError, load_settings

pytestmark = pytest.mark.sandbox

POLICY = "rate_limits:\n  auth_failures_per_client: 3/minute\n"


@contextmanager
def _server(data_dir: Path, trusted: str | None) -> Iterator[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        "NOX_POOL_SIZE": "0",
        "NOX_POOL_STEMS": "0",
        "NOX_POLICY_FILE": str(write_policy(data_dir, POLICY)),
        "NOX_API_TOKEN": "proxy-test-admin-token-0123456789",
    }
    if trusted is not None:
        env["NOX_TRUSTED_PROXIES"] = trusted
    with nox_serve(data_dir, port, **env):
        yield f"http://127.0.0.1:{port}"


def _failed_logins(base: str, forwarded_for: str, count: int) -> list[int]:
    headers = {"Authorization": "Bearer nox_wrong", "X-Forwarded-For": forwarded_for}
    return [httpx.get(f"{base}/api/me", headers=headers).status_code for _ in range(count)]


def test_a_trusted_proxy_passes_on_each_client_address(data_dir: Path) -> None:
    with _server(data_dir, "127.0.0.1") as base:
        assert _failed_logins(base, "203.0.113.7", 4) == [401, 401, 401, 429]
        # another client behind the same proxy is not locked out by the first one's failures
        assert _failed_logins(base, "203.0.113.8", 1) == [401]
        admin = {"Authorization": "Bearer proxy-test-admin-token-0123456789"}
        audit = httpx.get(f"{base}/api/audit", params={"action": "auth"}, headers=admin).json()
        assert {e["client"] for e in audit["items"]} == {"203.0.113.7", "203.0.113.8"}


def test_without_trusted_proxies_the_header_is_ignored(data_dir: Path) -> None:
    with _server(data_dir, None) as base:
        assert _failed_logins(base, "203.0.113.7", 3) == [401, 401, 401]
        # a client cannot escape its limit by making up another address
        assert _failed_logins(base, "203.0.113.8", 1) == [429]


@pytest.mark.parametrize("bad", ["*", "not-an-address", "10.0.0.0/33"])
def test_bad_trusted_proxies_stop_start_up(data_dir: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="NOX_TRUSTED_PROXIES"):
        load_settings(data_dir=data_dir, trusted_proxies=bad)
