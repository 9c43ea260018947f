"""The server's cache of recent authentications never outlives a revocation, an expiry or a
restore, whichever process makes it (services/token_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from tests.conftest import error_message, free_port, nox_of, nox_serve

from nox_api.config import Settings
from nox_api.services import token_cache
from nox_api.services.token_cache import PrincipalCache, RevocationMark
from nox_api.services.tokens import Principal, Role, TokenService
from nox_api.storage.db import Database

ME = "/api/me"


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _count_queries(db: Database) -> list[str]:
    """Every statement the database runs from now on (to tell a cache hit from a lookup)."""
    seen: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda *a: seen.append(str(a[2])))
    return seen


def test_a_second_request_is_answered_from_the_cache(client: TestClient) -> None:
    nox = nox_of(client)
    secret = nox.tokens.create("cached", Role.VIEWER).secret
    statements = _count_queries(nox.db)
    assert client.get(ME, headers=_bearer(secret)).status_code == 200
    lookups = [s for s in statements if "token_hash" in s]
    assert len(lookups) == 1
    assert client.get(ME, headers=_bearer(secret)).status_code == 200
    assert len([s for s in statements if "token_hash" in s]) == 1  # no second lookup


def test_a_revocation_by_another_process_ends_a_cached_token_at_once(
    client: TestClient, settings: Settings
) -> None:
    nox = nox_of(client)
    issued = nox.tokens.create("revoked-offline", Role.RUNNER)
    assert client.get(ME, headers=_bearer(issued.secret)).status_code == 200  # now cached
    env = {**os.environ, "NOX_DATA_DIR": str(settings.data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "nox_api", "token", "revoke", issued.principal.id],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    resp = client.get(ME, headers=_bearer(issued.secret))
    assert error_message(resp, 401, "unauthorized") == "unknown, expired or revoked token"


def test_a_revocation_through_the_api_ends_a_cached_token_on_a_real_server(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'nox.db'}")
    db.migrate()
    try:
        admin = TokenService(db).create("admin", Role.ADMIN).secret
        runner = TokenService(db).create("runner", Role.RUNNER)
    finally:
        db.close()
    port = free_port()
    with (
        nox_serve(data, port, NOX_SANDBOX_BACKEND="unsafe"),
        httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
    ):
        assert http.get(ME, headers=_bearer(runner.secret)).status_code == 200
        gone = http.delete(f"/api/tokens/{runner.principal.id}", headers=_bearer(admin))
        assert gone.status_code == 204, gone.text
        assert http.get(ME, headers=_bearer(runner.secret)).status_code == 401
    assert RevocationMark(data / "nox.db.revocations").read() == 1


def test_a_cached_token_expires_with_its_token() -> None:
    mark = RevocationMark(Path("/nonexistent-nox-test/nox.db.revocations"))  # reads as 0
    cache = PrincipalCache(mark)
    who = Principal("id1", "n", Role.VIEWER, "default")
    now = datetime.now(UTC)
    seen = cache.mark()
    cache.put("digest", who, now + timedelta(seconds=5), seen)
    assert cache.get("digest", seen, now) == who
    assert cache.get("digest", seen, now + timedelta(seconds=5)) is None
    assert cache.get("digest", seen, now) is None  # dropped once expired


def test_an_entry_made_while_the_mark_moved_is_not_kept(tmp_path: Path) -> None:
    mark = RevocationMark(tmp_path / "nox.db.revocations")
    cache = PrincipalCache(mark)
    who = Principal("id1", "n", Role.VIEWER, "default")
    now = datetime.now(UTC)
    before = cache.mark()  # read, then a revocation commits while the database is asked
    mark.bump()
    cache.mark()
    cache.put("digest", who, None, before)
    assert cache.get("digest", cache.mark(), now) is None


def test_entries_are_bounded_in_number_and_age(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = PrincipalCache(RevocationMark(tmp_path / "m"))
    now = datetime.now(UTC)
    seen = cache.mark()
    monkeypatch.setattr(token_cache, "MAX_ENTRIES", 3)
    for i in range(4):
        cache.put(f"d{i}", Principal(str(i), "n", Role.VIEWER, "default"), None, seen)
    assert cache.get("d0", seen, now) is None  # the fourth entry emptied a full cache
    assert cache.get("d3", seen, now) is not None
    monkeypatch.setattr(token_cache, "MAX_AGE_S", -1.0)
    assert cache.get("d3", seen, now) is None


def test_a_database_that_is_not_a_local_file_is_not_cached() -> None:
    db = Database("sqlite://")
    try:
        assert RevocationMark.of(db) is None
    finally:
        db.close()
