"""The dashboard's session cookie, CSRF tokens, sign-in and sign-out, and security headers, in
process (TestClient on the fake sandbox)."""

from __future__ import annotations

import json
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.conftest import nox_of, write_policy
from tests.ui.conftest import sign_in

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.services.tokens import Role
from nox_api.ui.headers import CONTENT_SECURITY_POLICY
from nox_api.ui.routing import safe_next
from nox_api.ui.session import KEY_FILE, SESSION_COOKIE, SessionKeeper

LOGIN_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
def browser(settings: Settings, fake: FakeSandbox) -> Any:
    """A client without a bearer token: the dashboard's cookies only."""
    with TestClient(create_app(settings, sandbox=fake)) as c:
        yield c


def _audit(settings: Settings) -> list[dict[str, Any]]:
    lines = (settings.audit_dir / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _use_cookie(client: TestClient, value: str) -> None:
    """Make ``value`` the session cookie the client sends (and the only one)."""
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, value, path="/ui")


def _set_cookie(resp: Any, name: str) -> str:
    for header in resp.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            return str(header)
    raise AssertionError(f"no Set-Cookie for {name}: {resp.headers}")


# --- sign-in ----------------------------------------------------------------------------------


def test_sign_in_sets_an_encrypted_http_only_strict_cookie(
    browser: TestClient, make_token: Callable[..., str], settings: Settings
) -> None:
    token = make_token(Role.RUNNER)
    form = browser.get("/ui/login")
    login_cookie = _set_cookie(form, "nox_login")
    assert "HttpOnly" in login_cookie
    assert "SameSite=strict" in login_cookie
    csrf = LOGIN_CSRF.search(form.text)
    assert csrf is not None
    done = browser.post(
        "/ui/login", data={"token": token, "csrf": csrf.group(1)}, follow_redirects=False
    )
    assert done.status_code == 303
    assert done.headers["location"] == "/ui"
    cookie = _set_cookie(done, SESSION_COOKIE)
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/ui" in cookie
    assert f"Max-Age={settings.ui_session_max_age_s}" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback; over HTTPS it is Secure (below)
    value = cookie.split(";")[0].split("=", 1)[1]
    assert token not in value
    assert token.removeprefix("nox_")[:12] not in value
    signed_in = [e for e in _audit(settings) if e["action"] == "ui.signin"]
    assert [(e["actor_name"], e["outcome"]) for e in signed_in] == [("test-runner", "ok")]


def test_the_cookie_is_secure_over_https(
    settings: Settings, fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    app = create_app(settings, sandbox=fake)
    with TestClient(app, base_url="https://nox.example") as c:
        form = c.get("/ui/login")
        assert "Secure" in _set_cookie(form, "nox_login")
        csrf = LOGIN_CSRF.search(form.text)
        assert csrf is not None
        done = c.post(
            "/ui/login",
            data={"token": make_token(Role.VIEWER), "csrf": csrf.group(1)},
            follow_redirects=False,
        )
        assert "Secure" in _set_cookie(done, SESSION_COOKIE)


def test_pages_need_a_session_and_come_back_after_sign_in(
    browser: TestClient, make_token: Callable[..., str]
) -> None:
    away = browser.get("/ui/history?offset=0", follow_redirects=False)
    assert away.status_code == 303
    assert away.headers["location"] == "/ui/login?next=%2Fui%2Fhistory%3Foffset%3D0"
    htmx = browser.get("/ui/files/list", headers={"HX-Request": "true"}, follow_redirects=False)
    assert htmx.status_code == 204
    assert htmx.headers["HX-Redirect"] == "/ui/login"
    form = browser.get(away.headers["location"])
    csrf = LOGIN_CSRF.search(form.text)
    assert csrf is not None
    assert 'name="next" value="/ui/history?offset=0"' in form.text
    done = browser.post(
        "/ui/login",
        data={"token": make_token(Role.VIEWER), "csrf": csrf.group(1), "next": "/ui/history"},
        follow_redirects=False,
    )
    assert done.headers["location"] == "/ui/history"


@pytest.mark.parametrize(
    "target",
    ["//evil.example/ui", "https://evil.example/ui", "/api/tokens", "/ui\\@evil", "/ui/login", ""],
)
def test_no_redirect_leaves_the_dashboard(target: str) -> None:
    assert safe_next(target) == "/ui"


def test_a_wrong_token_is_refused_audited_and_counted_per_client(
    data_dir: Path, fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    policy = write_policy(data_dir.parent, "rate_limits:\n  auth_failures_per_client: 2/minute\n")
    settings = load_settings(data_dir=data_dir, pool_size=0, policy_file=policy)
    good = make_token(Role.VIEWER)
    with TestClient(create_app(settings, sandbox=fake)) as c:
        answers = []
        for token in ("nox_" + "a" * 40, "not even a token", good):
            form = c.get("/ui/login")
            csrf = LOGIN_CSRF.search(form.text)
            assert csrf is not None
            answers.append(
                c.post("/ui/login", data={"token": token, "csrf": csrf.group(1)},
                       follow_redirects=False)
            )  # fmt: skip
        assert [a.status_code for a in answers] == [401, 401, 429]
        assert "Unknown, expired or revoked token." in answers[0].text
        assert "Too many failed sign-ins from testclient" in answers[2].text
        assert SESSION_COOKIE not in c.cookies
    failed = [e for e in _audit(settings) if e["action"] == "auth"]
    assert [(e["outcome"], e["target"]) for e in failed] == [("failed", "/ui/login")] * 2
    assert all(good not in json.dumps(e) for e in _audit(settings))


def test_the_sign_in_form_has_its_own_csrf_pair(
    browser: TestClient, make_token: Callable[..., str]
) -> None:
    token = make_token(Role.ADMIN)
    form = browser.get("/ui/login")
    csrf = LOGIN_CSRF.search(form.text)
    assert csrf is not None
    no_field = browser.post("/ui/login", data={"token": token}, follow_redirects=False)
    assert no_field.status_code == 403
    assert "The sign-in form expired" in no_field.text
    browser.cookies.clear()  # a form posted from elsewhere: no nox_login cookie
    no_cookie = browser.post(
        "/ui/login", data={"token": token, "csrf": csrf.group(1)}, follow_redirects=False
    )
    assert no_cookie.status_code == 403
    assert SESSION_COOKIE not in no_cookie.cookies


# --- the session --------------------------------------------------------------------------------


def test_a_tampered_or_foreign_cookie_is_no_session(
    browser: TestClient, make_token: Callable[..., str], settings: Settings
) -> None:
    sign_in(browser, make_token(Role.VIEWER))
    value = browser.cookies[SESSION_COOKIE]
    flipped = value[:40] + ("A" if value[40] != "A" else "B") + value[41:]
    _use_cookie(browser, flipped)
    assert browser.get("/ui", follow_redirects=False).status_code == 303
    other = SessionKeeper(b"another server's secret, 32 bytes+", settings.ui_session_max_age_s)
    foreign, _ = other.seal(make_token(Role.ADMIN))
    _use_cookie(browser, foreign)
    assert browser.get("/ui", follow_redirects=False).status_code == 303


def test_a_session_ends_after_its_lifetime(
    browser: TestClient, make_token: Callable[..., str], settings: Settings
) -> None:
    sign_in(browser, make_token(Role.VIEWER))
    keeper = SessionKeeper.from_settings(settings)  # the key file the server made
    token = make_token(Role.VIEWER)
    fresh, _ = keeper.seal(token, issued_at=int(time.time()) - settings.ui_session_max_age_s + 30)
    stale, _ = keeper.seal(token, issued_at=int(time.time()) - settings.ui_session_max_age_s - 1)
    _use_cookie(browser, fresh)
    assert browser.get("/ui").status_code == 200
    _use_cookie(browser, stale)
    assert browser.get("/ui", follow_redirects=False).headers["location"] == "/ui/login"


def test_revoking_the_token_ends_its_sessions_at_once(
    browser: TestClient, make_token: Callable[..., str]
) -> None:
    token = make_token(Role.RUNNER)
    sign_in(browser, token)
    nox = nox_of(browser)
    principal = nox.tokens.authenticate(token)
    assert principal is not None
    nox.tokens.revoke(principal.id)
    away = browser.get("/ui/files", follow_redirects=False)
    assert away.status_code == 303
    assert away.headers["location"] == "/ui/login?next=%2Fui%2Ffiles&reason=expired"
    form = browser.get(away.headers["location"])
    assert "Your session ended: sign in again." in form.text


def test_sign_out_ends_the_session_even_for_a_copy_of_the_cookie(
    browser: TestClient, make_token: Callable[..., str], settings: Settings
) -> None:
    csrf = sign_in(browser, make_token(Role.VIEWER))
    copy = browser.cookies[SESSION_COOKIE]
    out = browser.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)
    assert out.status_code == 303
    assert out.headers["location"] == "/ui/login"
    assert 'nox_session=""' in _set_cookie(out, SESSION_COOKIE)
    _use_cookie(browser, copy)
    assert browser.get("/ui", follow_redirects=False).status_code == 303
    assert [e["actor_name"] for e in _audit(settings) if e["action"] == "ui.signout"] == [
        "test-viewer"
    ]


def test_the_session_key_is_made_once_private_and_kept(
    settings: Settings, fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    token = make_token(Role.VIEWER)
    with TestClient(create_app(settings, sandbox=fake)) as first:
        sign_in(first, token)
        cookie = first.cookies[SESSION_COOKIE]
    key = settings.data_path / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", key.read_text())
    with TestClient(create_app(settings, sandbox=fake)) as second:  # a restarted server
        _use_cookie(second, cookie)
        assert second.get("/ui").status_code == 200


def test_a_configured_secret_is_used_instead_of_a_key_file(
    data_dir: Path, fake: FakeSandbox
) -> None:
    secret = "s" * 40
    settings = load_settings(data_dir=data_dir, pool_size=0, ui_session_secret=secret)
    with TestClient(create_app(settings, sandbox=fake)) as c:
        assert c.get("/ui/login").status_code == 200
    assert not (data_dir / KEY_FILE).exists()
    keeper = SessionKeeper(secret.encode(), settings.ui_session_max_age_s)
    cookie, session = keeper.seal("nox_whatever")
    assert SessionKeeper.from_settings(settings).open(cookie) == session


# --- CSRF ----------------------------------------------------------------------------------------


def test_state_changing_requests_need_the_sessions_csrf_token(
    browser: TestClient, make_token: Callable[..., str], settings: Settings, fake: FakeSandbox
) -> None:
    csrf = sign_in(browser, make_token(Role.ADMIN))
    code = {"code": "print(1)", "kind": "python"}
    assert browser.post("/ui/run", data=code).status_code == 403
    assert browser.post("/ui/run", data={**code, "csrf": "0" * 64}).status_code == 403
    assert browser.post("/ui/run", data=code, headers={"X-CSRF-Token": "x"}).status_code == 403
    cross = browser.post("/ui/run", data={**code, "csrf": csrf},
                         headers={"Sec-Fetch-Site": "cross-site"})  # fmt: skip
    assert cross.status_code == 403
    assert "another site" in cross.text
    assert fake.runs == []
    # another session's token is not this one's
    other = TestClient(browser.app)
    other_csrf = sign_in(other, make_token(Role.ADMIN))
    assert other_csrf != csrf
    assert browser.post("/ui/run", data={**code, "csrf": other_csrf}).status_code == 403
    assert fake.runs == []
    assert browser.post("/ui/run", data={**code, "csrf": csrf}).status_code == 200
    assert browser.post("/ui/run", data=code, headers={"X-CSRF-Token": csrf}).status_code == 200
    assert len(fake.runs) == 2
    denied = [e for e in _audit(settings) if e["action"] == "auth" and e["outcome"] == "denied"]
    reasons = [e["details"]["reason"] for e in denied]
    assert reasons == ["csrf", "csrf", "csrf", "cross-site request", "csrf"]
    assert {e["target"] for e in denied} == {"/ui/run"}


def test_a_refused_post_as_json_for_scripts_and_a_page_for_people(
    browser: TestClient, make_token: Callable[..., str]
) -> None:
    sign_in(browser, make_token(Role.RUNNER))
    script = browser.put("/ui/files/upload/a.txt", content=b"x",
                         headers={"Accept": "application/json"})  # fmt: skip
    assert script.status_code == 403
    assert script.json()["error"]["code"] == "forbidden"
    assert script.json()["error"]["request_id"] == script.headers["X-Request-ID"]
    person = browser.post("/ui/files/delete", data={"path": "a.txt"})
    assert person.status_code == 403
    assert person.headers["content-type"].startswith("text/html")
    assert "CSRF token is missing or wrong" in person.text
    assert "Traceback" not in person.text


def test_an_upload_takes_its_csrf_token_from_the_header_only(
    browser: TestClient, make_token: Callable[..., str]
) -> None:
    csrf = sign_in(browser, make_token(Role.RUNNER))
    as_form = browser.put(
        "/ui/files/upload/f.txt", files={"csrf": (None, csrf)},
        headers={"Accept": "application/json"},
    )  # fmt: skip
    assert as_form.status_code == 403
    assert "CSRF" in as_form.json()["error"]["message"]
    ok = browser.put("/ui/files/upload/f.txt", content=b"f", headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 201


# --- headers ----------------------------------------------------------------------------------


def test_every_answer_carries_the_security_headers(
    browser: TestClient, make_token: Callable[..., str]
) -> None:
    csrf = sign_in(browser, make_token(Role.RUNNER))
    browser.put("/ui/files/upload/f.txt", content=b"hi", headers={"X-CSRF-Token": csrf})
    answers = {
        "page": browser.get("/ui"),
        "fragment": browser.get("/ui/files/list", headers={"HX-Request": "true"}),
        "sign-in": browser.get("/ui/login"),
        "error": browser.get("/ui/history/nope"),
        "redirect": TestClient(browser.app).get("/ui/run", follow_redirects=False),
        "static": browser.get("/ui/static/app.js"),
        "vendor": browser.get("/ui/static/vendor/htmx.min.js"),
        "download": browser.get("/ui/files/download", params={"path": "f.txt"}),
    }
    assert [a.status_code for a in answers.values()] == [200, 200, 200, 404, 303, 200, 200, 200]
    for name, answer in answers.items():
        assert answer.headers["X-Content-Type-Options"] == "nosniff", name
        assert answer.headers["Referrer-Policy"] == "no-referrer", name
        assert answer.headers["X-Frame-Options"] == "DENY", name
        if name == "download":  # the API's own, stricter policy for user files
            assert answer.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
            assert answer.headers["Content-Disposition"].startswith("attachment;")
        else:
            assert answer.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, name
        if name not in ("static", "vendor", "download"):
            assert answer.headers["Cache-Control"] == "no-store", name
    policy = dict(
        part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";") if part.strip()
    )
    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert "X-Content-Type-Options" not in browser.get("/health").headers  # the API is untouched


def test_pages_have_no_inline_script_or_style(
    browser: TestClient, make_token: Callable[..., str]
) -> None:
    sign_in(browser, make_token(Role.ADMIN))
    pages = ["/ui", "/ui/files", "/ui/run", "/ui/history", "/ui/logs", "/ui/admin/tokens"]
    pages += ["/ui/admin/audit", "/ui/admin/backups", "/ui/admin/policy", "/ui/login"]
    for path in pages:
        html = browser.get(path).text
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == [], path
        assert "<style" not in html, path
        assert not re.search(r"\sstyle=", html), path
        assert not re.search(r"\son[a-z]+=", html), path
        assert "hx-on" not in html, path
