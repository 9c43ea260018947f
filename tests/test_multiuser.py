"""Multi-user Nox over HTTP, on the fake sandbox: roles per route, workspaces, the tokens API,
rate limits, quotas, the policy API, the audit log API and the shell deny-list."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from httpx2 import Response
from pydantic import SecretStr
from tests.conftest import error_message as _error
from tests.conftest import nox_of, write_policy

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.deps import PUBLIC_ROUTES, ROLE_PERMISSIONS, Permission
from nox_api.engine.fake import FakeSandbox
from nox_api.services.policy import Policy, parse_policy
from nox_api.services.tokens import Role, hash_secret
from nox_api.state import Nox
from nox_api.storage.models import ExecutionRow, TokenRow

KIB = 1024
MIB = 1024 * KIB
NO_TOKEN = {"Authorization": ""}
FORK_BOMB = ":(){ :|:& };:"


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _audit_file(settings: Settings) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(settings.audit_dir.glob("audit*.jsonl")))


@pytest.fixture
def serve(data_dir: Path, fake: FakeSandbox, admin_token: str) -> Iterator[Callable[..., Any]]:
    """Start an app on ``data_dir`` with a policy file of the given YAML text; the test client
    sends the ``test-admin`` token unless a request says otherwise."""
    stack = contextlib.ExitStack()

    def start(policy: str) -> tuple[TestClient, Settings]:
        settings = load_settings(
            data_dir=data_dir, pool_size=0, policy_file=write_policy(data_dir, policy)
        )
        app = create_app(settings, sandbox=fake)
        c = stack.enter_context(TestClient(app, headers=_auth(admin_token)))
        return c, settings

    with stack:
        yield start


# --- 1. every route x every role --------------------------------------------------------------

_RANK = {None: 0, Role.VIEWER: 1, Role.RUNNER: 2, Role.ADMIN: 3}
_NEEDS = {Role.VIEWER: Permission.READ, Role.RUNNER: Permission.RUN, Role.ADMIN: Permission.ADMIN}


def _victim(nox: Nox) -> str:
    return nox.tokens.create("victim", Role.VIEWER).principal.id


def _backup_name(nox: Nox) -> str:
    """A new backup name; the matrix's server gets a backup key for it (it has none)."""
    if nox.settings.backup_key is None:
        nox.settings.backup_key = SecretStr("ab" * 32)
    return f"matrix-{time.monotonic_ns()}"


def _backup(nox: Nox) -> str:
    """A backup to restore, made directly (no request)."""
    name = _backup_name(nox)
    nox.backups.create(name, None)
    return name


def _matrix_file(nox: Nox) -> str:
    """A new file in the default workspace, to read or delete (written directly)."""
    name = f"matrix{time.monotonic_ns()}.txt"
    (nox.workspaces.path("default") / name).write_bytes(b"matrix")
    return name


def _history_id(nox: Nox) -> str:
    """A run in the history of the default workspace (written directly: no sandbox run)."""
    run_id = f"matrix{time.monotonic_ns()}"
    with nox.db.session() as s:
        s.add(
            ExecutionRow(
                id=run_id, kind="python", status="ok", exit_code=0, stdout="", stderr="",
                stdout_truncated=False, stderr_truncated=False, duration_ms=1.0,
                started_at=datetime.now(UTC), workspace="default", actor="matrix", code="pass",
            )
        )  # fmt: skip
    return run_id


# (method, path) -> (least role allowed, None: public; status when allowed; the request)
ROUTES: dict[tuple[str, str], tuple[Role | None, int, Callable[[Nox], dict[str, Any]]]] = {
    ("GET", "/health"): (None, 200, lambda nox: {"url": "/health"}),
    # its own rule: loopback (the matrix asks from 127.0.0.1) or the scrape token
    ("GET", "/metrics"): (None, 200, lambda nox: {"url": "/metrics"}),
    ("POST", "/put"): (
        Role.RUNNER,
        201,
        lambda nox: {"url": "/put", "files": {"file": ("m.txt", b"matrix")}},
    ),
    ("GET", "/api/files"): (Role.VIEWER, 200, lambda nox: {"url": "/api/files"}),
    ("GET", "/api/files/{path:path}"): (
        Role.VIEWER,
        200,
        lambda nox: {"url": f"/api/files/{_matrix_file(nox)}"},
    ),
    ("PUT", "/api/files/{path:path}"): (
        Role.RUNNER,
        201,
        lambda nox: {"url": "/api/files/matrix/put.txt", "content": b"matrix"},
    ),
    ("DELETE", "/api/files/{path:path}"): (
        Role.RUNNER,
        204,
        lambda nox: {"url": f"/api/files/{_matrix_file(nox)}"},
    ),
    ("POST", "/api/files/search"): (
        Role.VIEWER,
        200,
        lambda nox: {"url": "/api/files/search", "json": {"query": "matrix"}},
    ),
    ("POST", "/run_py"): (
        Role.RUNNER,
        200,
        lambda nox: {"url": "/run_py", "json": {"code": "print(1)"}},
    ),
    ("POST", "/run_sh"): (
        Role.RUNNER,
        200,
        lambda nox: {"url": "/run_sh", "json": {"cmd": "echo 1"}},
    ),
    ("GET", "/api/me"): (Role.VIEWER, 200, lambda nox: {"url": "/api/me"}),
    ("GET", "/api/health/detailed"): (
        Role.VIEWER,
        200,
        lambda nox: {"url": "/api/health/detailed"},
    ),
    ("POST", "/api/sandbox/clean"): (
        Role.ADMIN,
        200,
        lambda nox: {"url": "/api/sandbox/clean", "json": {"dry_run": True}},
    ),
    ("GET", "/api/logs"): (Role.ADMIN, 200, lambda nox: {"url": "/api/logs?tail=5"}),
    ("GET", "/api/logs/stream"): (
        Role.ADMIN,
        200,
        lambda nox: {"url": "/api/logs/stream", "params": {"duration_s": 0.05}},
    ),
    ("POST", "/api/tokens"): (
        Role.ADMIN,
        201,
        lambda nox: {"url": "/api/tokens", "json": {"name": "matrix", "role": "viewer"}},
    ),
    ("GET", "/api/tokens"): (Role.ADMIN, 200, lambda nox: {"url": "/api/tokens"}),
    ("DELETE", "/api/tokens/{token_id}"): (
        Role.ADMIN,
        204,
        lambda nox: {"url": f"/api/tokens/{_victim(nox)}"},
    ),
    ("GET", "/api/audit"): (Role.ADMIN, 200, lambda nox: {"url": "/api/audit"}),
    ("POST", "/api/backups"): (
        Role.ADMIN,
        201,
        lambda nox: {"url": "/api/backups", "json": {"name": _backup_name(nox)}},
    ),
    ("GET", "/api/backups"): (Role.ADMIN, 200, lambda nox: {"url": "/api/backups"}),
    ("POST", "/api/backups/{name}/restore"): (
        Role.ADMIN,
        200,
        lambda nox: {"url": f"/api/backups/{_backup(nox)}/restore"},
    ),
    ("GET", "/api/audit/verify"): (Role.ADMIN, 200, lambda nox: {"url": "/api/audit/verify"}),
    ("GET", "/api/policy"): (Role.ADMIN, 200, lambda nox: {"url": "/api/policy"}),
    ("POST", "/api/policy/reload"): (Role.ADMIN, 200, lambda nox: {"url": "/api/policy/reload"}),
    ("GET", "/api/history"): (Role.VIEWER, 200, lambda nox: {"url": "/api/history"}),
    ("GET", "/api/history/{execution_id}"): (
        Role.VIEWER,
        200,
        lambda nox: {"url": f"/api/history/{_history_id(nox)}"},
    ),
    ("GET", "/api/system/stats"): (Role.VIEWER, 200, lambda nox: {"url": "/api/system/stats"}),
    ("GET", "/api/system/resources"): (
        Role.VIEWER,
        200,
        lambda nox: {"url": "/api/system/resources"},
    ),
}


def _app_api_routes(c: TestClient) -> list[APIRoute]:
    """The app's APIRoutes. Since FastAPI 0.16x ``app.routes`` holds included routers, not
    their routes: walking it for APIRoute instances alone finds nothing."""
    routes = c.app.routes  # type: ignore[attr-defined]
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: the routes themselves
        found = [route for route in routes if isinstance(route, APIRoute)]
    else:
        found = [
            ctx.original_route
            for ctx in iter_route_contexts(routes)
            if isinstance(ctx.original_route, APIRoute)
        ]
    assert found, "no APIRoute found: the walk over app.routes is broken"
    # The dashboard's routes (/ui) authenticate with its session cookie, not a bearer token, so
    # this matrix cannot call them: tests/ui/test_session.py walks them the same way (one
    # permission each, declared with nox_api.ui.access.allow) and checks every role on each.
    return [route for route in found if not route.path.startswith("/ui")]


def _api_routes(c: TestClient) -> set[tuple[str, str]]:
    return {(method, route.path) for route in _app_api_routes(c) for method in route.methods}


def _permissions(route: APIRoute) -> list[Permission]:
    return [
        d.call.nox_permission  # type: ignore[attr-defined]
        for d in route.dependant.dependencies
        if hasattr(d.call, "nox_permission")
    ]


def test_every_route_is_in_the_role_table(client: TestClient) -> None:
    """A new route fails here until it gets a row in ROUTES (and a place in the matrix)."""
    assert _api_routes(client) == set(ROUTES)


def test_every_api_route_declares_one_permission_or_is_public(client: TestClient) -> None:
    # This walk sees the routes of the included routers (app.routes alone finds none).
    undeclared = [
        route.path
        for route in _app_api_routes(client)
        if route.path not in PUBLIC_ROUTES and len(_permissions(route)) != 1
    ]
    assert undeclared == []
    public = {route.path for route in _app_api_routes(client) if not _permissions(route)}
    assert public == {"/health", "/metrics"}
    assert public <= PUBLIC_ROUTES


def test_each_route_declares_the_permission_of_its_table_row(client: TestClient) -> None:
    for route in _app_api_routes(client):
        for method in route.methods:
            least = ROUTES[(method, route.path)][0]
            expected = [] if least is None else [_NEEDS[least]]
            assert _permissions(route) == expected, (method, route.path)


def test_role_matrix_of_every_route(
    client: TestClient, fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    nox = nox_of(client)
    callers: dict[Role | None, dict[str, str]] = {
        None: NO_TOKEN,
        Role.VIEWER: _auth(make_token(Role.VIEWER)),
        Role.RUNNER: _auth(make_token(Role.RUNNER)),
        Role.ADMIN: _auth(make_token(Role.ADMIN)),
    }
    seen: list[tuple[str, str, str, int]] = []
    untouched_victims: list[str] = []
    local = TestClient(client.app, client=("127.0.0.1", 50000))  # /metrics is for loopback
    for method, path in sorted(_api_routes(client)):
        least, ok_status, build = ROUTES[(method, path)]
        for role, headers in callers.items():
            kwargs = build(nox)
            url = kwargs.pop("url")
            resp = local.request(method, url, headers=headers, **kwargs)
            who = role.value if role else "no token"
            seen.append((method, path, who, resp.status_code))
            if least is None:
                assert resp.status_code == ok_status, (method, path, who, resp.text)
                assert "X-RateLimit-Limit" not in resp.headers
            elif role is None:
                message = _error(resp, 401, "unauthorized")
                assert message.startswith("missing bearer token")
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                # one failed authentication per route: more routes than the shipped policy's
                # 20 failures a minute per client (tested on its own below)
                nox.limiter.reset()
            elif _RANK[role] < _RANK[least]:
                message = _error(resp, 403, "forbidden")
                need = _NEEDS[least].value
                assert message == f"the {role.value} role may not do this (needs {need})"
                assert _NEEDS[least] not in ROLE_PERMISSIONS[role]
                if method == "DELETE" and path == "/api/tokens/{token_id}":
                    untouched_victims.append(url.rsplit("/", 1)[1])
            else:
                assert resp.status_code == ok_status, (method, path, who, resp.text)
                # every route behind a token is rate limited, and says so
                limit = {Role.VIEWER: "120", Role.RUNNER: "60", Role.ADMIN: "600"}[role]
                assert resp.headers.get("X-RateLimit-Limit") == limit, (method, path, who)
                assert int(resp.headers["X-RateLimit-Remaining"]) < int(limit)
    assert len(seen) == 4 * len(ROUTES)
    # only the runner's and the admin's runs reached the sandbox
    assert len(fake.runs) == 4
    assert [run.kind for run in fake.runs] == ["python", "python", "shell", "shell"]
    assert len(untouched_victims) == 2
    for victim in untouched_victims:
        info = nox.tokens.get(victim)
        assert info is not None
        assert info.revoked_at is None


def test_forbidden_requests_are_audited_as_denied(
    client: TestClient, make_token: Callable[..., str]
) -> None:
    viewer = _auth(make_token(Role.VIEWER))
    _error(client.post("/run_py", json={"code": "print(1)"}, headers=viewer), 403, "forbidden")
    denied = client.get("/api/audit", params={"action": "auth"}).json()["items"]
    assert len(denied) == 1
    entry = denied[0]
    assert (entry["outcome"], entry["actor_name"], entry["role"]) == (
        "denied",
        "test-viewer",
        "viewer",
    )
    assert entry["target"] == "/run_py"
    assert entry["details"] == {"reason": "needs run"}


# --- 2. workspaces -----------------------------------------------------------------------------


def test_uploads_and_runs_stay_in_the_token_workspace(
    client: TestClient, settings: Settings, fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    a = _auth(make_token(Role.RUNNER, "a"))
    b = _auth(make_token(Role.RUNNER, "b"))
    up = client.post("/put", files={"file": ("x.txt", b"from a")}, headers=a)
    assert up.status_code == 201, up.text
    assert up.json()["path"] == "x.txt"
    assert (settings.workspaces_dir / "a" / "x.txt").read_bytes() == b"from a"
    assert not (settings.workspaces_dir / "b" / "x.txt").exists()
    assert not (settings.workspaces_dir / "default" / "x.txt").exists()

    run_b = client.post("/run_py", json={"code": "print(open('x.txt').read())"}, headers=b)
    assert run_b.status_code == 200
    assert run_b.json()["workspace"] == "b"
    assert str(fake.runs[-1].workspace).endswith("/b")
    assert fake.runs[-1].workspace == settings.workspaces_dir / "b"

    run_a = client.post("/run_sh", json={"cmd": "cat x.txt"}, headers=a)
    assert run_a.json()["workspace"] == "a"
    assert str(fake.runs[-1].workspace).endswith("/a")


@pytest.mark.parametrize("other", ["a", "ghost", "Not_A-Name!"])
def test_a_runner_naming_another_workspace_gets_the_same_403(
    client: TestClient, settings: Settings, make_token: Callable[..., str], other: str
) -> None:
    owner = _auth(make_token(Role.RUNNER, "a"))
    assert client.post("/put", files={"file": ("x.txt", b"a's")}, headers=owner).status_code == 201
    b = _auth(make_token(Role.RUNNER, "b"))
    resp = client.post(
        "/put", params={"workspace": other}, files={"file": ("x.txt", b"b's")}, headers=b
    )
    message = _error(resp, 403, "forbidden")
    # the same words whether or not the workspace exists (or could exist)
    assert message == "only an admin may act on another workspace"
    assert (settings.workspaces_dir / "a" / "x.txt").read_bytes() == b"a's"
    assert not (settings.workspaces_dir / "b" / "x.txt").exists()
    assert sorted(p.name for p in settings.workspaces_dir.iterdir()) == ["a", "default"]
    assert list(settings.staging_dir.iterdir()) == []


def test_a_runner_naming_its_own_workspace_is_fine(
    client: TestClient, settings: Settings, make_token: Callable[..., str]
) -> None:
    b = _auth(make_token(Role.RUNNER, "b"))
    resp = client.post("/put", params={"workspace": "b"}, files={"file": ("y", b"y")}, headers=b)
    assert resp.status_code == 201
    assert (settings.workspaces_dir / "b" / "y").read_bytes() == b"y"


def test_an_admin_uploads_into_another_workspace(
    client: TestClient, settings: Settings, make_token: Callable[..., str]
) -> None:
    make_token(Role.RUNNER, "a")
    resp = client.post("/put", params={"workspace": "a"}, files={"file": ("x.txt", b"admin's")})
    assert resp.status_code == 201, resp.text
    assert (settings.workspaces_dir / "a" / "x.txt").read_bytes() == b"admin's"
    assert not (settings.workspaces_dir / "default" / "x.txt").exists()
    entry = client.get("/api/audit", params={"action": "file.upload"}).json()["items"][0]
    assert (entry["workspace"], entry["target"], entry["actor_name"]) == (
        "a",
        "x.txt",
        "test-admin",
    )
    assert nox_of(client).quotas.usage("a").upload_bytes == len(b"admin's")
    assert nox_of(client).quotas.usage("default").upload_bytes == 0

    bad = client.post("/put", params={"workspace": "Bad Name"}, files={"file": ("x", b"x")})
    assert "workspace name 'Bad Name'" in _error(bad, 400, "invalid_request")
    assert not any(" " in p.name for p in settings.workspaces_dir.iterdir())


# --- 3. tokens ---------------------------------------------------------------------------------


def test_token_lifecycle_create_use_list_revoke(client: TestClient, settings: Settings) -> None:
    created = client.post(
        "/api/tokens", json={"name": "ci-bot", "role": "runner", "workspace": "team-a"}
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"id", "name", "role", "workspace", "token", "created_at", "expires_at"}
    assert (body["name"], body["role"], body["workspace"]) == ("ci-bot", "runner", "team-a")
    assert body["expires_at"] is None
    secret = body["token"]
    assert secret.startswith("nox_")
    assert len(secret) >= 40

    me = client.get("/api/me", headers=_auth(secret))
    assert me.status_code == 200
    assert me.json() == {
        "id": body["id"],
        "name": "ci-bot",
        "role": "runner",
        "workspace": "team-a",
    }
    run = client.post("/run_sh", json={"cmd": "echo hi"}, headers=_auth(secret))
    assert (run.status_code, run.json()["actor"], run.json()["workspace"]) == (
        200,
        "ci-bot",
        "team-a",
    )

    listing = client.get("/api/tokens")
    assert listing.status_code == 200
    items = {item["id"]: item for item in listing.json()["items"]}
    assert set(items[body["id"]]) == {
        "id", "name", "role", "workspace", "created_at", "expires_at", "revoked_at", "active",
    }  # fmt: skip
    assert items[body["id"]]["active"] is True
    assert {item["name"] for item in items.values()} == {"ci-bot", "test-admin"}
    for text in (listing.text, client.get("/api/tokens", params={"workspace": "team-a"}).text):
        assert secret not in text
        assert secret.removeprefix("nox_") not in text
        assert hash_secret(secret) not in text
    narrowed = client.get("/api/tokens", params={"workspace": "team-a"}).json()["items"]
    assert [item["id"] for item in narrowed] == [body["id"]]

    assert client.delete(f"/api/tokens/{body['id']}").status_code == 204
    gone = client.get("/api/me", headers=_auth(secret))
    assert _error(gone, 401, "unauthorized") == "unknown, expired or revoked token"
    after = {i["id"]: i for i in client.get("/api/tokens").json()["items"]}[body["id"]]
    assert after["active"] is False
    assert after["revoked_at"] is not None
    assert client.delete(f"/api/tokens/{body['id']}").status_code == 204  # twice is fine

    audit = _audit_file(settings)
    assert secret.encode() not in audit
    assert secret.removeprefix("nox_").encode() not in audit


def test_default_workspace_and_expiry_of_a_created_token(client: TestClient) -> None:
    before = datetime.now(UTC)
    body = client.post(
        "/api/tokens", json={"name": "tmp", "role": "viewer", "expires_in_days": 7}
    ).json()
    assert body["workspace"] == "default"
    expires = datetime.fromisoformat(body["expires_at"])
    assert before + timedelta(days=7) <= expires <= datetime.now(UTC) + timedelta(days=7)


def test_revoking_an_unknown_token_is_404(client: TestClient) -> None:
    message = _error(client.delete("/api/tokens/0123456789abcdef"), 404, "not_found")
    assert message == "no token with id '0123456789abcdef'"
    failed = client.get("/api/audit", params={"action": "token.revoke"}).json()["items"]
    assert [(e["outcome"], e["target"]) for e in failed] == [("failed", "0123456789abcdef")]


def test_an_expired_token_is_refused(client: TestClient) -> None:
    nox = nox_of(client)
    issued = nox.tokens.create("short-lived", Role.RUNNER, expires_in_days=1)
    assert client.get("/api/me", headers=_auth(issued.secret)).status_code == 200
    with nox.db.session() as session:
        row = session.get(TokenRow, issued.principal.id)
        assert row is not None
        row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    # An edit of the database behind the services' back: say so, as a restore does, or the
    # server's cache of recent authentications would keep the old expiry for up to a minute.
    nox.tokens.changed()
    resp = client.get("/api/me", headers=_auth(issued.secret))
    assert _error(resp, 401, "unauthorized") == "unknown, expired or revoked token"
    listed = {i["id"]: i for i in client.get("/api/tokens").json()["items"]}
    assert listed[issued.principal.id]["active"] is False
    assert listed[issued.principal.id]["revoked_at"] is None


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"name": "x", "role": "superuser"}, 422, "role: Input should be 'viewer', 'runner'"),
        ({"name": "x", "role": "runner", "workspace": "Team A"}, 400, "workspace name 'Team A'"),
        ({"name": "x", "role": "runner", "workspace": "../etc"}, 400, "workspace name '../etc'"),
        ({"name": "x", "role": "runner", "admin": True}, 422, "admin: Extra inputs"),
        ({"name": "", "role": "runner"}, 422, "name: String should have at least 1 character"),
        ({"name": "a\nb", "role": "runner"}, 400, "token name must be"),
        ({"name": "x", "role": "runner", "expires_in_days": 0}, 422, "expires_in_days"),
        ({"role": "runner"}, 422, "name: Field required"),
    ],
)
def test_invalid_token_requests_are_refused(
    client: TestClient, body: dict[str, object], status: int, fragment: str
) -> None:
    resp = client.post("/api/tokens", json=body)
    assert fragment in _error(resp, status, "invalid_request")
    assert [i["name"] for i in client.get("/api/tokens").json()["items"]] == ["test-admin"]


# --- 4. rate limits ----------------------------------------------------------------------------

RATE_POLICY = """
rate_limits:
  roles:
    runner: 3/2 seconds
  auth_failures_per_client: 3/2 seconds
  tokens:
    vip: 5/2 seconds
"""


def _retry_after(resp: Response) -> int:
    retry = int(resp.headers["Retry-After"])
    assert 1 <= retry <= 2
    return retry


def test_rate_limit_counts_down_refuses_and_recovers(
    serve: Callable[..., Any], fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    c, _ = serve(RATE_POLICY)
    runner = _auth(make_token(Role.RUNNER))
    answers = [c.post("/run_py", json={"code": "print(1)"}, headers=runner) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [r.headers["X-RateLimit-Limit"] for r in answers] == ["3", "3", "3"]
    assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["2", "1", "0"]
    assert [r.headers["X-RateLimit-Reset"] for r in answers[:2]] == ["0", "0"]
    assert 1 <= int(answers[2].headers["X-RateLimit-Reset"]) <= 2

    refused = c.post("/run_py", json={"code": "print(1)"}, headers=runner)
    message = _error(refused, 429, "rate_limited")
    assert message.startswith("rate limit of 3/2 seconds reached for token 'test-runner'")
    retry = _retry_after(refused)
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert len(fake.runs) == 3  # the refused request ran nothing
    _error(c.get("/api/me", headers=runner), 429, "rate_limited")  # every route of the token

    other = _auth(make_token(Role.RUNNER))  # same role and name, its own count
    fresh = c.get("/api/me", headers=other)
    assert (fresh.status_code, fresh.headers["X-RateLimit-Remaining"]) == (200, "2")

    time.sleep(retry + 0.1)
    again = c.post("/run_py", json={"code": "print(1)"}, headers=runner)
    assert again.status_code == 200
    assert again.headers["X-RateLimit-Limit"] == "3"
    assert len(fake.runs) == 4


def test_error_answers_of_a_counted_request_carry_the_rate_headers(
    serve: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    c, _ = serve(RATE_POLICY)
    runner = _auth(make_token(Role.RUNNER))
    too_long = c.post("/run_py", json={"code": "print(1)", "timeout_s": 61}, headers=runner)
    _error(too_long, 400, "invalid_request")
    assert too_long.headers["X-RateLimit-Remaining"] == "2"
    no_code = c.post("/run_py", json={}, headers=runner)
    _error(no_code, 422, "invalid_request")
    assert no_code.headers["X-RateLimit-Remaining"] == "1"


def test_rate_override_by_token_name_and_by_id(
    serve: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    c, started = serve(RATE_POLICY)
    nox = nox_of(c)
    vip = _auth(nox.tokens.create("vip", Role.RUNNER).secret)
    answers = [c.get("/api/me", headers=vip) for _ in range(5)]
    assert [r.status_code for r in answers] == [200] * 5
    assert [r.headers["X-RateLimit-Limit"] for r in answers] == ["5"] * 5
    assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["4", "3", "2", "1", "0"]
    refused = c.get("/api/me", headers=vip)
    assert "rate limit of 5/2 seconds reached for token 'vip'" in _error(
        refused, 429, "rate_limited"
    )
    _retry_after(refused)
    # the role's rate for other runners, the defaults for the roles the file left out
    assert (
        c.get("/api/me", headers=_auth(make_token(Role.RUNNER))).headers["X-RateLimit-Limit"] == "3"
    )
    assert (
        c.get("/api/me", headers=_auth(make_token(Role.VIEWER))).headers["X-RateLimit-Limit"]
        == "120"
    )
    assert c.get("/api/me").headers["X-RateLimit-Limit"] == "600"

    bound = nox.tokens.create("bound", Role.RUNNER)
    started.policy_path.write_text(
        RATE_POLICY + f"    {bound.principal.id}: 7/minute\n    bound: 9/minute\n"
    )
    assert c.post("/api/policy/reload").status_code == 200
    me = c.get("/api/me", headers=_auth(bound.secret))
    assert me.headers["X-RateLimit-Limit"] == "7"  # the id wins over the name


def test_failed_authentication_blocks_the_address(
    serve: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    c, _ = serve(RATE_POLICY)
    good = _auth(make_token(Role.RUNNER))
    for headers in (_auth("nox_wrong"), NO_TOKEN, {"Authorization": "Basic dXNlcjpwYXNz"}):
        _error(c.get("/api/me", headers=headers), 401, "unauthorized")
    blocked = c.get("/api/me", headers=_auth("nox_wrong"))
    message = _error(blocked, 429, "rate_limited")
    assert message.startswith("too many failed authentications from testclient")
    retry = _retry_after(blocked)
    assert blocked.headers["X-RateLimit-Limit"] == "3"
    assert blocked.headers["X-RateLimit-Remaining"] == "0"

    refused = c.get("/api/me", headers=good)  # a valid token from the same address
    assert _error(refused, 429, "rate_limited").startswith("too many failed authentications")
    _retry_after(refused)
    run = c.post("/run_py", json={"code": "print(1)"}, headers=good)
    _error(run, 429, "rate_limited")
    assert c.get("/health").status_code == 200  # public routes stay open

    elsewhere = TestClient(c.app, client=("192.0.2.7", 40000))  # same app, another address
    assert elsewhere.get("/api/me", headers=good).status_code == 200

    time.sleep(retry + 0.1)
    back = c.get("/api/me", headers=good)
    assert back.status_code == 200
    assert back.json()["name"] == "test-runner"


# --- 5. quotas ---------------------------------------------------------------------------------

QUOTA_POLICY = """
quotas:
  default:
    runs_per_day: 2
    storage_mib: 1
    upload_mib_per_day: 3
  workspaces:
    big:
      runs_per_day: 4
    nocpu:
      cpu_seconds_per_day: 0
    thrifty:
      upload_mib_per_day: 1
      storage_mib: 10
"""


def test_runs_per_day_quota(
    serve: Callable[..., Any], fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    c, _ = serve(QUOTA_POLICY)
    default = _auth(make_token(Role.RUNNER))
    for _ in range(2):
        assert c.post("/run_py", json={"code": "print(1)"}, headers=default).status_code == 200
    refused = c.post("/run_py", json={"code": "print(1)"}, headers=default)
    message = _error(refused, 429, "quota_exceeded")
    assert message.startswith("workspace 'default' has used 2 of its 2 runs today; 0 left")
    assert "00:00 UTC" in message
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400  # room again at midnight UTC
    _error(c.post("/run_sh", json={"cmd": "echo 1"}, headers=default), 429, "quota_exceeded")
    # the quota is the workspace's: the admin token of the same workspace is refused too
    _error(c.post("/run_sh", json={"cmd": "echo 1"}), 429, "quota_exceeded")
    assert len(fake.runs) == 2

    # the override applies to its workspace only
    big = _auth(make_token(Role.RUNNER, "big"))
    for _ in range(4):
        assert c.post("/run_sh", json={"cmd": "echo 1"}, headers=big).status_code == 200
    assert "has used 4 of its 4 runs" in _error(
        c.post("/run_sh", json={"cmd": "echo 1"}, headers=big), 429, "quota_exceeded"
    )
    other = _auth(make_token(Role.RUNNER, "other"))
    assert [
        c.post("/run_sh", json={"cmd": "echo 1"}, headers=other).status_code for _ in range(3)
    ] == [200, 200, 429]
    assert len(fake.runs) == 8
    denied = c.get("/api/audit", params={"action": "run"}).json()["items"]
    assert sum(e["outcome"] == "denied" for e in denied) == 5
    assert {e["details"]["reason"] for e in denied if e["outcome"] == "denied"} == {"quota"}


def test_cpu_seconds_quota(
    serve: Callable[..., Any], fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    c, _ = serve(QUOTA_POLICY)
    nocpu = _auth(make_token(Role.RUNNER, "nocpu"))
    message = _error(
        c.post("/run_py", json={"code": "print(1)"}, headers=nocpu), 429, "quota_exceeded"
    )
    assert message.startswith("workspace 'nocpu' has used 0.0 of its 0 CPU seconds today; 0 left")
    assert fake.runs == []


def test_storage_quota_is_507_and_writes_nothing(
    serve: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    c, settings = serve(QUOTA_POLICY)
    runner = _auth(make_token(Role.RUNNER))
    ws = settings.workspaces_dir / "default"
    first = c.post("/put", files={"file": ("one.bin", b"1" * (600 * KIB))}, headers=runner)
    assert first.status_code == 201
    second = c.post("/put", files={"file": ("two.bin", b"2" * (600 * KIB))}, headers=runner)
    message = _error(second, 507, "storage_quota_exceeded")
    assert message.startswith("workspace 'default' stores 0.6 of its 1 MiB; 0.4 MiB left")
    assert not (ws / "two.bin").exists()
    assert list(settings.staging_dir.iterdir()) == []
    assert sorted(p.name for p in ws.iterdir()) == ["one.bin"]

    # exactly what is left fits; then not one byte more
    rest = c.post("/put", files={"file": ("rest.bin", b"3" * (424 * KIB))}, headers=runner)
    assert rest.status_code == 201, rest.text
    full = c.post("/put", files={"file": ("byte", b"4")}, headers=runner)
    assert "0.0 MiB left" in _error(full, 507, "storage_quota_exceeded")
    assert not (ws / "byte").exists()
    assert list(settings.staging_dir.iterdir()) == []
    assert nox_of(c).quotas.usage("default").upload_bytes == 1024 * KIB


def test_daily_upload_quota_is_429(
    serve: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    c, settings = serve(QUOTA_POLICY)
    thrifty = _auth(make_token(Role.RUNNER, "thrifty"))
    ws = settings.workspaces_dir / "thrifty"
    ok = c.post("/put", files={"file": ("a.bin", b"a" * (600 * KIB))}, headers=thrifty)
    assert ok.status_code == 201
    over = c.post("/put", files={"file": ("b.bin", b"b" * (600 * KIB))}, headers=thrifty)
    message = _error(over, 429, "quota_exceeded")
    assert message.startswith(
        "workspace 'thrifty' has uploaded 0.6 of its 1 MiB today; 0.4 MiB left"
    )
    assert not (ws / "b.bin").exists()
    assert list(settings.staging_dir.iterdir()) == []
    # an overwrite counts as an upload too; the admin's uploads count against the workspace
    assert (
        c.post("/put", files={"file": ("a.bin", b"c" * (424 * KIB))}, headers=thrifty).status_code
        == 201
    )
    admin_into = c.post("/put", params={"workspace": "thrifty"}, files={"file": ("d", b"d")})
    assert "workspace 'thrifty' has uploaded 1.0 of its 1 MiB today; 0.0 MiB left" in _error(
        admin_into, 429, "quota_exceeded"
    )
    # the default workspace keeps its own, larger daily allowance
    default = _auth(make_token(Role.RUNNER))
    assert (
        c.post("/put", files={"file": ("e.bin", b"e" * (600 * KIB))}, headers=default).status_code
        == 201
    )


# --- 6. the policy over the API ----------------------------------------------------------------


def test_policy_endpoint_shows_the_shipped_defaults(client: TestClient, settings: Settings) -> None:
    resp = client.get("/api/policy")
    assert resp.status_code == 200
    assert resp.json() == Policy().to_public_dict()
    shipped = settings.policy_path.read_bytes()
    assert resp.headers["X-Nox-Policy-SHA256"] == hashlib.sha256(shipped).hexdigest()
    assert resp.headers["X-Nox-Policy-Source"] == "policies.yaml"
    loaded = datetime.fromisoformat(resp.headers["X-Nox-Policy-Loaded-At"])
    assert timedelta(0) <= datetime.now(UTC) - loaded < timedelta(minutes=5)


OLD_POLICY = "limits:\n  maxima:\n    timeout_s: 30\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "limits:\n  maxima:\n    timeout_s: lots\n",
            "policy.yaml: limits.maxima.timeout_s: Input should be a valid number",
        ),
        (
            "limits:\n  maxima:\n    timeout: 5\n",
            "policy.yaml: limits.maxima.timeout: unknown field (did you mean 'timeout_s'?)",
        ),
        (
            "limits:\n  defaults:\n    timeout_s: 45\n  maxima:\n    timeout_s: 40\n",
            "policy.yaml: limits.defaults.timeout_s: 45 is above limits.maxima.timeout_s (40)",
        ),
    ],
)
def test_a_bad_reload_is_400_and_keeps_the_old_policy(
    serve: Callable[..., Any], make_token: Callable[..., str], text: str, expected: str
) -> None:
    c, settings = serve(OLD_POLICY)
    before = c.get("/api/policy")
    assert before.json()["limits"]["maxima"]["timeout_s"] == 30
    settings.policy_path.write_text(text)
    resp = c.post("/api/policy/reload")
    message = _error(resp, 400, "invalid_request")
    assert message.startswith(expected)
    assert message.count("\n") == 0  # one problem, one line

    after = c.get("/api/policy")
    assert after.json() == before.json()
    assert after.headers["X-Nox-Policy-SHA256"] == before.headers["X-Nox-Policy-SHA256"]
    runner = _auth(make_token(Role.RUNNER))
    allowed = c.post("/run_py", json={"code": "print(1)", "timeout_s": 25}, headers=runner)
    assert allowed.status_code == 200
    assert allowed.json()["limits"]["timeout_s"] == 25
    above = c.post("/run_py", json={"code": "print(1)", "timeout_s": 35}, headers=runner)
    assert _error(above, 400, "invalid_request") == (
        "timeout_s 35 is above the policy's maximum of 30"
    )

    entries = c.get("/api/audit", params={"action": "policy.reload"}).json()["items"]
    assert [(e["outcome"], e["actor_name"]) for e in entries] == [("failed", "test-admin")]
    assert entries[0]["details"]["error"].startswith(expected)


def test_a_good_reload_changes_the_effective_limits(
    serve: Callable[..., Any], fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    c, settings = serve(OLD_POLICY)
    runner = _auth(make_token(Role.RUNNER))
    assert (
        c.post("/run_py", json={"code": "print(1)", "timeout_s": 25}, headers=runner).status_code
        == 200
    )
    new = "limits:\n  maxima:\n    timeout_s: 20\nrate_limits:\n  roles:\n    runner: 7/minute\n"
    settings.policy_path.write_text(new)
    resp = c.post("/api/policy/reload")
    assert resp.status_code == 200, resp.text
    assert resp.json() == parse_policy(new).to_public_dict()
    assert resp.json()["limits"]["maxima"]["timeout_s"] == 20
    assert resp.headers["X-Nox-Policy-SHA256"] == hashlib.sha256(new.encode()).hexdigest()
    assert c.get("/api/policy").json() == resp.json()

    above = c.post("/run_py", json={"code": "print(1)", "timeout_s": 25}, headers=runner)
    assert _error(above, 400, "invalid_request") == (
        "timeout_s 25 is above the policy's maximum of 20"
    )
    assert above.headers["X-RateLimit-Limit"] == "7"
    at_max = c.post("/run_py", json={"code": "print(1)", "timeout_s": 20}, headers=runner)
    assert at_max.status_code == 200
    assert len(fake.runs) == 2
    assert fake.ceiling.timeout_s == 20  # warm sandboxes follow the new ceiling

    reloads = c.get("/api/audit", params={"action": "policy.reload"}).json()["items"]
    assert [(e["outcome"], e["actor_name"]) for e in reloads] == [("ok", "test-admin")]
    assert reloads[0]["details"]["sha256"] == hashlib.sha256(new.encode()).hexdigest()
    changes = c.get("/api/audit", params={"action": "policy.change"}).json()["items"]
    assert len(changes) == 1
    assert changes[0]["details"]["sha256"] == hashlib.sha256(new.encode()).hexdigest()


# --- 7. the audit log over the API -------------------------------------------------------------


def test_audit_records_who_did_what_and_detects_tampering(
    client: TestClient, settings: Settings, make_token: Callable[..., str]
) -> None:
    code = "print('audit-marker-code-7f3a')"
    _error(client.get("/api/me", headers=_auth("nox_bogus")), 401, "unauthorized")
    alice = client.post(
        "/api/tokens", json={"name": "alice", "role": "runner", "workspace": "team-a"}
    ).json()
    run = client.post("/run_py", json={"code": code}, headers=_auth(alice["token"]))
    assert run.status_code == 200
    put = client.post("/put", files={"file": ("r.txt", b"r")}, headers=_auth(alice["token"]))
    assert put.status_code == 201
    viewer = _auth(make_token(Role.VIEWER))
    _error(client.get("/api/tokens", headers=viewer), 403, "forbidden")
    assert client.delete(f"/api/tokens/{alice['id']}").status_code == 204

    resp = client.get("/api/audit")
    assert resp.status_code == 200
    items = resp.json()["items"]
    assert [(e["action"], e["outcome"], e["actor_name"]) for e in items] == [
        ("token.revoke", "ok", "test-admin"),
        ("auth", "denied", "test-viewer"),
        ("file.upload", "ok", "alice"),
        ("run", "ok", "alice"),
        ("token.create", "ok", "test-admin"),
        ("auth", "failed", None),
    ]
    assert [e["seq"] for e in items] == [6, 5, 4, 3, 2, 1]
    revoke, denied, upload, run_entry, create, failed = items
    assert (revoke["target"], revoke["workspace"]) == (alice["id"], "team-a")
    assert (create["target"], create["workspace"]) == (alice["id"], "team-a")
    assert create["details"]["role"] == "runner"
    assert (upload["target"], upload["workspace"], upload["details"]["size"]) == (
        "r.txt",
        "team-a",
        1,
    )
    assert (run_entry["actor_id"], run_entry["role"], run_entry["workspace"]) == (
        alice["id"],
        "runner",
        "team-a",
    )
    assert run_entry["details"]["code_sha256"] == hashlib.sha256(code.encode()).hexdigest()
    assert run_entry["request_id"] == run.headers["X-Request-ID"] == run.json()["request_id"]
    assert denied["details"]["reason"] == "needs admin"
    assert (failed["actor_id"], failed["target"], failed["client"]) == (
        None,
        "/api/me",
        "testclient",
    )
    assert failed["details"]["reason"] == "unknown, expired or revoked token"
    assert all(len(e["mac"]) == 64 for e in items)

    runs = client.get("/api/audit", params={"action": "run"}).json()["items"]
    assert [e["seq"] for e in runs] == [3]
    by_name = client.get("/api/audit", params={"actor": "alice"}).json()["items"]
    assert [e["action"] for e in by_name] == ["file.upload", "run"]
    by_id = client.get("/api/audit", params={"actor": alice["id"]}).json()["items"]
    assert by_id == by_name
    by_ws = client.get("/api/audit", params={"workspace": "team-a"}).json()["items"]
    assert [e["seq"] for e in by_ws] == [6, 4, 3, 2]
    assert [e["seq"] for e in client.get("/api/audit", params={"limit": 2}).json()["items"]] == [
        6,
        5,
    ]
    both = client.get("/api/audit", params={"action": "run", "actor": "test-admin"})
    assert both.json()["items"] == []

    log_bytes = _audit_file(settings)
    assert code.encode() not in log_bytes
    assert b"audit-marker-code" not in log_bytes
    assert alice["token"].encode() not in log_bytes
    assert "audit-marker-code" not in resp.text

    verify = client.get("/api/audit/verify")
    assert verify.status_code == 200
    assert verify.json() == {
        "ok": True, "entries": 6, "first_bad_line": None, "reason": None, "file": None,
    }  # fmt: skip

    path = settings.audit_dir / "audit.jsonl"
    original = path.read_bytes()
    lines = original.split(b"\n")
    assert len(lines) == 7
    assert lines[-1] == b""
    # one byte inside line 3 (the run): alice becomes alicf
    assert b'"actor_name":"alice"' in lines[2]
    edited = lines[2].replace(b'"actor_name":"alice"', b'"actor_name":"alicf"')
    path.write_bytes(b"\n".join([*lines[:2], edited, *lines[3:]]))
    report = client.get("/api/audit/verify").json()
    assert report["ok"] is False
    assert report["first_bad_line"] == 3
    assert report["entries"] == 2
    assert report["reason"].startswith("edited")
    assert report["file"] == "audit.jsonl"

    path.write_bytes(original)
    assert client.get("/api/audit/verify").json()["ok"] is True

    path.write_bytes(b"\n".join(lines[:5]) + b"\n")  # the last line cut off
    report = client.get("/api/audit/verify").json()
    assert report["ok"] is False
    assert report["reason"].startswith("truncated")
    assert report["first_bad_line"] == 6
    assert report["entries"] == 5


def test_audit_query_validation(client: TestClient) -> None:
    _error(client.get("/api/audit", params={"limit": 0}), 422, "invalid_request")
    _error(client.get("/api/audit", params={"limit": 1001}), 422, "invalid_request")
    bad = client.get("/api/audit", params={"workspace": "No Such!"})
    assert "workspace name 'No Such!'" in _error(bad, 400, "invalid_request")


# --- 8. the shell deny-list --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "pattern"),
    [
        (FORK_BOMB, r":\(\)\s*\{"),
        ("rm -rf /", r"\brm\s+(-[\w-]+\s+)*-\w*[rR]\w*\s+(-[\w-]+\s+)*/\*?(\s|;|&|\||$)"),
        ("mkfs.ext4 /dev/sda1", r"\bmkfs(\.\w+)?\b"),
        ("dd if=/dev/zero of=/dev/sda", r"\bdd\b.*\bof=/dev/"),
    ],
    ids=["fork-bomb", "rm-rf-root", "mkfs", "dd-to-device"],
)
def test_denied_shell_commands_are_403_and_never_run(
    client: TestClient,
    fake: FakeSandbox,
    make_token: Callable[..., str],
    cmd: str,
    pattern: str,
) -> None:
    runner = _auth(make_token(Role.RUNNER))
    resp = client.post("/run_sh", json={"cmd": cmd}, headers=runner)
    message = _error(resp, 403, "forbidden")
    assert message == f"the policy refuses this command (it matches {pattern!r})"
    assert fake.runs == []
    assert nox_of(client).quotas.usage("default").runs == 0
    entry = client.get("/api/audit", params={"action": "run"}).json()["items"][0]
    assert (entry["outcome"], entry["actor_name"]) == ("denied", "test-runner")
    assert entry["details"]["reason"] == "shell deny-list"
    assert entry["details"]["code_sha256"] == hashlib.sha256(cmd.encode()).hexdigest()
    assert cmd.encode() not in json.dumps(entry).encode()

    fine = client.post("/run_sh", json={"cmd": "echo fine"}, headers=runner)
    assert (fine.status_code, fine.json()["stdout"]) == (200, "fine\n")
    assert len(fake.runs) == 1


def test_the_deny_list_comes_from_the_policy(serve: Callable[..., Any], fake: FakeSandbox) -> None:
    c, _ = serve("shell:\n  deny_patterns:\n    - '\\bcurl\\b'\n")
    resp = c.post("/run_sh", json={"cmd": "curl http://example.com"})
    assert (
        _error(resp, 403, "forbidden")
        == r"the policy refuses this command (it matches '\\bcurl\\b')"
    )
    assert fake.runs == []
    assert c.post("/run_py", json={"code": "print('curl')"}).status_code == 200  # shell only


def test_parallel_runs_cannot_pass_runs_per_day_together(
    serve: Callable[..., Any], fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    """Runs of one workspace admitted at once each count against the quota from the start:
    six runs started together against a quota of four, all still running, leave two refused."""
    import threading

    from nox_api.engine.fake import _default_handler

    c, _ = serve(QUOTA_POLICY)
    big = _auth(make_token(Role.RUNNER, "big"))
    release = threading.Event()
    running = threading.Semaphore(0)

    def slow(spec: Any) -> Any:
        running.release()
        assert release.wait(10)
        return _default_handler(spec)

    fake.handler = slow
    codes: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        code = c.post("/run_sh", json={"cmd": "echo 1"}, headers=big).status_code
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for _ in range(4):  # four runs are inside the sandbox together ...
        assert running.acquire(timeout=10)
    deadline = time.monotonic() + 10
    while len(codes) < 2:  # ... and the other two were refused meanwhile
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert codes == [429, 429]
    release.set()
    for t in threads:
        t.join(10)
    assert sorted(codes) == [200] * 4 + [429] * 2


def test_a_run_the_sandbox_could_not_start_does_not_count(
    serve: Callable[..., Any], fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    c, _ = serve(QUOTA_POLICY)
    default = _auth(make_token(Role.RUNNER))
    fake.unavailable = "no sandbox today"
    for _ in range(3):
        _error(c.post("/run_py", json={"code": "1"}, headers=default), 503, "sandbox_unavailable")
    fake.unavailable = None
    assert [
        c.post("/run_py", json={"code": "1"}, headers=default).status_code for _ in range(3)
    ] == [200, 200, 429]
