"""Every dashboard route for every role, and what the pages do, in process (TestClient on the
fake sandbox). The bearer-token matrix of tests/test_multiuser.py leaves /ui out; this is its
counterpart for the session cookie."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from tests.conftest import nox_of, write_policy
from tests.ui.conftest import BACKUP_KEY, sign_in

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.deps import Permission
from nox_api.engine.fake import FakeSandbox
from nox_api.services.tokens import Role
from nox_api.state import Nox
from nox_api.ui import render as ui_render

_RANK = {Role.VIEWER: 1, Role.RUNNER: 2, Role.ADMIN: 3}
_NEEDS = {Role.VIEWER: Permission.READ, Role.RUNNER: Permission.RUN, Role.ADMIN: Permission.ADMIN}


@pytest.fixture
def ui_settings(data_dir: Path) -> Settings:
    return load_settings(data_dir=data_dir, pool_size=0, backup_key=BACKUP_KEY)


@pytest.fixture
def app_client(ui_settings: Settings, fake: FakeSandbox) -> Iterator[TestClient]:
    with TestClient(create_app(ui_settings, sandbox=fake)) as c:
        yield c


def _token(nox: Nox, role: Role, workspace: str = "default") -> str:
    return nox.tokens.create(f"ui-{role.value}", role, workspace).secret


def _file(nox: Nox) -> str:
    name = f"m{time.monotonic_ns()}.txt"
    (nox.workspaces.path("default") / name).write_bytes(b"matrix")
    return name


def _run_id(nox: Nox, token: str) -> str:
    principal = nox.tokens.authenticate(token)
    from nox_api.services.auditing import Caller
    from noxsdk.models import RunPython

    return nox.executions.run(Caller(principal), RunPython(code="print(1)")).id


def _backup(nox: Nox) -> str:
    name = f"m{time.monotonic_ns()}"
    nox.backups.create(name, None)
    return name


# (method, path) -> (least role, None: public; status when allowed; the request's kwargs)
Build = Callable[[Nox, str], dict[str, Any]]
UI_ROUTES: dict[tuple[str, str], tuple[Role | None, int, Build]] = {
    ("GET", "/ui/login"): (None, 200, lambda nox, csrf: {"url": "/ui/login"}),
    ("POST", "/ui/login"): (None, 403, lambda nox, csrf: {"url": "/ui/login", "data": {}}),
    ("POST", "/ui/logout"): (
        Role.VIEWER, 303, lambda nox, csrf: {"url": "/ui/logout", "data": {"csrf": csrf}},
    ),
    ("GET", "/ui"): (Role.VIEWER, 200, lambda nox, csrf: {"url": "/ui"}),
    ("GET", "/ui/files"): (Role.VIEWER, 200, lambda nox, csrf: {"url": "/ui/files"}),
    ("GET", "/ui/files/list"): (Role.VIEWER, 200, lambda nox, csrf: {"url": "/ui/files/list"}),
    ("GET", "/ui/files/view"): (
        Role.VIEWER, 200, lambda nox, csrf: {"url": f"/ui/files/view?path={_file(nox)}"},
    ),
    ("GET", "/ui/files/download"): (
        Role.VIEWER, 200, lambda nox, csrf: {"url": f"/ui/files/download?path={_file(nox)}"},
    ),
    ("POST", "/ui/files/delete"): (
        Role.RUNNER, 303,
        lambda nox, csrf: {"url": "/ui/files/delete", "data": {"csrf": csrf, "path": _file(nox)}},
    ),
    ("PUT", "/ui/files/upload/{path:path}"): (
        Role.RUNNER, 201,
        lambda nox, csrf: {"url": "/ui/files/upload/up/m.txt", "content": b"m",
                           "headers": {"X-CSRF-Token": csrf}},
    ),
    ("GET", "/ui/run"): (Role.RUNNER, 200, lambda nox, csrf: {"url": "/ui/run"}),
    ("POST", "/ui/run"): (
        Role.RUNNER, 200,
        lambda nox, csrf: {"url": "/ui/run", "data": {"csrf": csrf, "code": "print(1)"}},
    ),
    ("GET", "/ui/history"): (Role.VIEWER, 200, lambda nox, csrf: {"url": "/ui/history"}),
    ("GET", "/ui/history/{run_id}"): (
        Role.VIEWER, 200,
        lambda nox, csrf: {"url": f"/ui/history/{_run_id(nox, _token(nox, Role.RUNNER))}"},
    ),
    ("GET", "/ui/logs"): (Role.ADMIN, 200, lambda nox, csrf: {"url": "/ui/logs"}),
    ("GET", "/ui/logs/stream"): (
        Role.ADMIN, 200, lambda nox, csrf: {"url": "/ui/logs/stream?duration_s=0.05"},
    ),
    ("GET", "/ui/admin"): (Role.ADMIN, 303, lambda nox, csrf: {"url": "/ui/admin"}),
    ("GET", "/ui/admin/tokens"): (Role.ADMIN, 200, lambda nox, csrf: {"url": "/ui/admin/tokens"}),
    ("POST", "/ui/admin/tokens"): (
        Role.ADMIN, 200,
        lambda nox, csrf: {"url": "/ui/admin/tokens",
                           "data": {"csrf": csrf, "name": "m", "role": "viewer"}},
    ),
    ("POST", "/ui/admin/tokens/{token_id}/revoke"): (
        Role.ADMIN, 200,
        lambda nox, csrf: {
            "url": f"/ui/admin/tokens/{nox.tokens.create('victim', Role.VIEWER).principal.id}"
            "/revoke",
            "data": {"csrf": csrf},
        },
    ),
    ("GET", "/ui/admin/audit"): (Role.ADMIN, 200, lambda nox, csrf: {"url": "/ui/admin/audit"}),
    ("GET", "/ui/admin/backups"): (
        Role.ADMIN, 200, lambda nox, csrf: {"url": "/ui/admin/backups"},
    ),
    ("POST", "/ui/admin/backups"): (
        Role.ADMIN, 200,
        lambda nox, csrf: {"url": "/ui/admin/backups",
                           "data": {"csrf": csrf, "name": f"m{time.monotonic_ns()}"}},
    ),
    ("POST", "/ui/admin/backups/{name}/restore"): (
        Role.ADMIN, 200,
        lambda nox, csrf: {"url": f"/ui/admin/backups/{_backup(nox)}/restore",
                           "data": {"csrf": csrf}},
    ),
    ("GET", "/ui/admin/policy"): (Role.ADMIN, 200, lambda nox, csrf: {"url": "/ui/admin/policy"}),
    ("POST", "/ui/admin/policy/reload"): (
        Role.ADMIN, 200, lambda nox, csrf: {"url": "/ui/admin/policy/reload",
                                            "data": {"csrf": csrf}},
    ),
}  # fmt: skip


def _ui_routes(client: TestClient) -> list[APIRoute]:
    from fastapi.routing import iter_route_contexts

    routes = [
        ctx.original_route
        for ctx in iter_route_contexts(client.app.routes)  # type: ignore[attr-defined]
        if isinstance(ctx.original_route, APIRoute)
    ]
    found = [route for route in routes if route.path.startswith("/ui")]
    assert found, "no dashboard route found"
    return found


def _permissions(route: APIRoute) -> list[Permission]:
    return [
        d.call.nox_permission  # type: ignore[attr-defined]
        for d in route.dependant.dependencies
        if hasattr(d.call, "nox_permission")
    ]


def test_every_dashboard_route_is_in_the_table_with_its_permission(
    app_client: TestClient,
) -> None:
    routes = _ui_routes(app_client)
    assert {(m, r.path) for r in routes for m in r.methods} == set(UI_ROUTES)
    for route in routes:
        for method in route.methods:
            least = UI_ROUTES[(method, route.path)][0]
            expected = [] if least is None else [_NEEDS[least]]
            assert _permissions(route) == expected, (method, route.path)
            assert route.include_in_schema is False  # the OpenAPI schema is the API's alone


def test_role_matrix_of_every_dashboard_route(
    app_client: TestClient, fake: FakeSandbox, ui_settings: Settings
) -> None:
    nox = nox_of(app_client)
    seen = []
    for (method, path), (least, ok_status, build) in sorted(UI_ROUTES.items()):
        for role in (None, Role.VIEWER, Role.RUNNER, Role.ADMIN):
            client = TestClient(app_client.app)
            csrf = sign_in(client, _token(nox, role)) if role is not None else "0" * 64
            kwargs = build(nox, csrf)
            url = kwargs.pop("url")
            resp = client.request(method, url, follow_redirects=False, **kwargs)
            who = role.value if role else "no session"
            seen.append((method, path, who, resp.status_code))
            if least is None:  # the sign-in page: a signed-in browser goes on to the dashboard
                expected = 303 if role is not None and method == "GET" else ok_status
                assert resp.status_code == expected, (method, path, who, resp.text)
            elif role is None:
                assert resp.status_code == 303, (method, path, who)
                assert resp.headers["location"].startswith("/ui/login"), (method, path)
            elif _RANK[role] < _RANK[least]:
                assert resp.status_code == 403, (method, path, who, resp.text)
                need = _NEEDS[least].value
                assert f"the {role.value} role may not do this (needs {need})" in resp.text
            else:
                assert resp.status_code == ok_status, (method, path, who, resp.text[:2000])
                assert "Traceback" not in resp.text
    assert len(seen) == 4 * len(UI_ROUTES)
    denied = [e for e in _audit(ui_settings) if e["action"] == "auth" and e["outcome"] == "denied"]
    below = sum(
        1 for least, _s, _b in UI_ROUTES.values() if least is not None for role in _RANK
        if _RANK[role] < _RANK[least]
    )  # fmt: skip
    assert len(denied) >= below  # every refusal by role is audited (restores add their own)


def _audit(settings: Settings) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(settings.audit_dir.glob("audit*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def _admin(app_client: TestClient) -> str:
    return sign_in(app_client, _token(nox_of(app_client), Role.ADMIN))


# --- pages ---------------------------------------------------------------------------------------


def test_home_shows_the_backend_version_and_todays_runs(
    app_client: TestClient, fake: FakeSandbox
) -> None:
    csrf = sign_in(app_client, _token(nox_of(app_client), Role.RUNNER))
    for code in ("print(1)", "sys.exit(2)"):
        assert app_client.post("/ui/run", data={"csrf": csrf, "code": code}).status_code == 200
    html = app_client.get("/ui").text
    assert '<td id="backend">fake</td>' in html
    assert '<td id="isolation">fake</td>' in html
    assert re.search(r'<td id="version">\d+\.\d+\.\d+', html)
    today = dict(re.findall(r'<b data-status="(\w+)">(\d+)</b>', html))
    assert (today["ok"], today["error"]) == ("1", "1")
    assert sum(int(n) for n in today.values()) == 2
    assert "Runs and files of workspace <code>default</code>" in html


def test_a_plain_form_post_gets_the_whole_page_htmx_a_fragment(app_client: TestClient) -> None:
    csrf = _admin(app_client)
    data = {"csrf": csrf, "code": "print('hi')", "kind": "python"}
    page = app_client.post("/ui/run", data=data)
    fragment = app_client.post("/ui/run", data=data, headers={"HX-Request": "true"})
    assert page.text.startswith("<!doctype html>")
    assert 'id="run-result"' in page.text
    assert "print(&#39;hi&#39;)</textarea>" in page.text  # the editor keeps the code
    assert fragment.text.lstrip().startswith('<div class="result card" id="run-result"')
    shell = app_client.post(
        "/ui/run", data={"csrf": csrf, "code": "echo 1", "kind": "cobol"},
        headers={"HX-Request": "true"},
    )  # fmt: skip
    assert shell.status_code == 400
    assert "unknown kind" in shell.text


def test_file_names_and_contents_are_escaped(app_client: TestClient) -> None:
    nox = nox_of(app_client)
    name = "<img src=x onerror=alert(1)>.txt"
    (nox.workspaces.path("default") / name).write_text("<script>alert(2)</script>")
    _admin(app_client)
    listing = app_client.get("/ui/files").text
    assert "&lt;img src=x onerror=alert(1)&gt;.txt" in listing
    assert "<img src=x" not in listing
    view = app_client.get("/ui/files/view", params={"path": name}).text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in view
    assert "<script>alert(2)" not in view


def test_a_binary_or_long_file_is_not_shown_whole(data_dir: Path, fake: FakeSandbox) -> None:
    settings = load_settings(data_dir=data_dir, pool_size=0, ui_view_max_bytes=1024)
    with TestClient(create_app(settings, sandbox=fake)) as c:
        nox = nox_of(c)
        folder = nox.workspaces.path("default")
        (folder / "blob.bin").write_bytes(b"\x00\x01\x02")
        (folder / "long.txt").write_text("é" * 1000)  # 2000 bytes; the cut splits a character
        sign_in(c, _token(nox, Role.VIEWER))
        blob = c.get("/ui/files/view", params={"path": "blob.bin"})
        assert "is not UTF-8 text" in blob.text
        long = c.get("/ui/files/view", params={"path": "long.txt"}).text
        assert "Showing the first 1.0 KiB of 2.0 KiB" in long
        shown = re.search(r'<pre class="file-text" id="file-text">(.*?)</pre>', long, re.S)
        assert shown is not None
        assert shown.group(1) == "é" * 512


def test_uploads_stream_past_the_json_body_cap_up_to_the_upload_limit(
    data_dir: Path, fake: FakeSandbox
) -> None:
    settings = load_settings(data_dir=data_dir, pool_size=0, max_upload_bytes=8 * 1024 * 1024)
    with TestClient(create_app(settings, sandbox=fake)) as c:
        nox = nox_of(c)
        csrf = sign_in(c, _token(nox, Role.RUNNER))
        big = b"x" * (nox.request_body_limit() + 1024)
        ok = c.put("/ui/files/upload/big.bin", content=big, headers={"X-CSRF-Token": csrf})
        assert ok.status_code == 201, ok.text
        assert ok.json()["size"] == len(big)
        too_big = c.put(
            "/ui/files/upload/huge.bin", content=b"x" * (settings.max_upload_bytes + 1),
            headers={"X-CSRF-Token": csrf, "Accept": "application/json"},
        )  # fmt: skip
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "payload_too_large"
        uploads = [e for e in _audit(settings) if e["action"] == "file.upload"]
        assert [e["target"] for e in uploads] == ["big.bin"]


def test_history_pages_by_twenty(app_client: TestClient) -> None:
    csrf = sign_in(app_client, _token(nox_of(app_client), Role.RUNNER))
    for n in range(23):
        app_client.post("/ui/run", data={"csrf": csrf, "code": f"print({n})"})
    first = app_client.get("/ui/history").text
    assert first.count("<tr data-run=") == 20
    assert 'href="/ui/history?offset=20">Older' in first
    rest = app_client.get("/ui/history?offset=20").text
    assert rest.count("<tr data-run=") == 3
    assert 'href="/ui/history?offset=0">Newer' in rest


def test_another_workspaces_run_is_not_found(app_client: TestClient) -> None:
    nox = nox_of(app_client)
    theirs = _run_id(nox, _token(nox, Role.RUNNER, "other"))
    sign_in(app_client, _token(nox, Role.VIEWER))
    assert app_client.get(f"/ui/history/{theirs}").status_code == 404
    assert app_client.get(f"/ui/run?from={theirs}").status_code == 403  # viewers have no editor


def test_a_token_made_in_the_dashboard_works_and_bad_input_is_explained(
    app_client: TestClient, ui_settings: Settings
) -> None:
    csrf = _admin(app_client)
    made = app_client.post(
        "/ui/admin/tokens",
        data={"csrf": csrf, "name": "ci bot", "role": "runner", "workspace": "team-a",
              "expires_in_days": "30"},
    )  # fmt: skip
    secret = re.search(r'id="new-secret" value="(nox_[^"]+)"', made.text)
    assert secret is not None
    principal = nox_of(app_client).tokens.authenticate(secret.group(1))
    assert principal is not None
    assert (principal.name, principal.role, principal.workspace) == (
        "ci bot",
        Role.RUNNER,
        "team-a",
    )
    assert secret.group(1) not in app_client.get("/ui/admin/tokens").text
    bad = app_client.post(
        "/ui/admin/tokens", data={"csrf": csrf, "name": "x", "role": "root"},
        headers={"HX-Request": "true"},
    )  # fmt: skip
    assert bad.status_code == 400
    assert "role" in bad.text
    workspace = app_client.post(
        "/ui/admin/tokens", data={"csrf": csrf, "name": "x", "role": "viewer", "workspace": "../x"}
    )
    assert workspace.status_code == 400
    assert "workspace" in workspace.text
    created = [e for e in _audit(ui_settings) if e["action"] == "token.create"]
    assert [e["details"]["name"] for e in created] == ["ui-admin", "ci bot"][1:]


def test_restore_from_the_dashboard(app_client: TestClient, ui_settings: Settings) -> None:
    csrf = _admin(app_client)
    made = app_client.post("/ui/admin/backups", data={"csrf": csrf, "name": "before"})
    assert "Backup before written." in made.text
    assert '<tr data-backup="before">' in made.text
    restored = app_client.post("/ui/admin/backups/before/restore", data={"csrf": csrf})
    assert restored.status_code == 200, restored.text
    assert "Restored before; the state before was saved as pre-restore-" in restored.text
    assert re.search(r"<th>tokens</th><td>\d+</td>", restored.text)
    missing = app_client.post("/ui/admin/backups/nope/restore", data={"csrf": csrf})
    assert missing.status_code == 404
    assert "no backup named" in missing.text
    outcomes = [(e["target"], e["outcome"]) for e in _audit(ui_settings)
                if e["action"] == "backup.restore"]  # fmt: skip
    assert outcomes[-2:] == [("before", "ok"), ("nope", "failed")]


def test_a_bad_policy_file_is_refused_and_the_old_one_kept(
    data_dir: Path, fake: FakeSandbox
) -> None:
    policy = write_policy(data_dir.parent, "limits:\n  defaults:\n    timeout_s: 5\n")
    settings = load_settings(data_dir=data_dir, pool_size=0, policy_file=policy)
    with TestClient(create_app(settings, sandbox=fake)) as c:
        csrf = sign_in(c, _token(nox_of(c), Role.ADMIN))
        before = nox_of(c).policy.source_sha256
        policy.write_text("limits:\n  defaults:\n    timeout_s: -1\n")
        refused = c.post("/ui/admin/policy/reload", data={"csrf": csrf},
                         headers={"HX-Request": "true"})  # fmt: skip
        assert refused.status_code == 400
        assert "The file was refused; the policy in force stays." in refused.text
        assert nox_of(c).policy.source_sha256 == before
        assert f'id="policy-sha">{before}<' in refused.text


def test_a_banner_says_when_the_front_end_files_are_not_built(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _admin(app_client)
    assert "front-end files are not built" not in app_client.get("/ui").text
    monkeypatch.setattr(ui_render, "HTMX_FILE", tmp_path / "missing.js")
    assert "front-end files are not built" in app_client.get("/ui").text


def test_static_files_are_named_by_their_mount_in_the_metrics(app_client: TestClient) -> None:
    assert app_client.get("/ui/static/app.css").status_code == 200
    assert app_client.get("/ui/static/nope.css").status_code == 404
    local = TestClient(app_client.app, client=("127.0.0.1", 50000))
    metrics = local.get("/metrics").text
    assert 'route="/ui/static",status="200"' in metrics
    assert 'route="/ui/static",status="404"' in metrics
