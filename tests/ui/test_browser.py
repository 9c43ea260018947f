"""The dashboard in a real browser: Playwright drives Debian's Chromium against a real
``nox-api serve`` on 127.0.0.1 with the real bubblewrap sandbox. Every page also fails its test
on a Content-Security-Policy violation, a script error or an unexpected dialog (see ``ui``)."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from playwright.sync_api import expect
from tests.conftest import free_port
from tests.ui.conftest import DESKTOP, PHONE, Browsing, http_sign_in

pytestmark = pytest.mark.sandbox

DURATION = re.compile(r"^\d+(\.\d+)? (ms|s)$")


def _run(page: Any, code: str, *, kind: str = "python", keys: bool = False) -> None:
    """Type ``code`` into the editor and run it (Ctrl+Enter or the Run button)."""
    page.select_option("#kind", kind)
    page.fill("#code", code)
    if keys:
        page.press("#code", "Control+Enter")
    else:
        page.click("#run-button")


# JavaScript that builds a DataTransfer holding files given as (name, text) pairs
_DATA_TRANSFER = (
    "(files) => { const dt = new DataTransfer();"
    " for (const [name, text] of files) dt.items.add(new File([text], name));"
    " return dt; }"
)


def _drop(page: Any, files: list[tuple[str, str]]) -> None:
    """Drag ``files`` over the upload zone and drop them, as a person's mouse would."""
    transfer = page.evaluate_handle(_DATA_TRANSFER, files)
    page.dispatch_event("#upload", "dragenter", {"dataTransfer": transfer})
    page.dispatch_event("#upload", "dragover", {"dataTransfer": transfer})
    expect(page.locator("#upload")).to_have_class(re.compile(r"\bover\b"))
    page.dispatch_event("#upload", "drop", {"dataTransfer": transfer})


def test_sign_in_shows_the_server_and_keeps_the_token_from_scripts(ui: Browsing) -> None:
    page = ui.page()
    page.fill("#token", "nox_" + "x" * 40)
    page.click("button[type=submit]")
    expect(page.locator("#signin-error")).to_have_text("Unknown, expired or revoked token.")
    token = ui.token("runner")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/ui$"))
    version = ui.server.api("GET", "/health").json()["version"]
    expect(page.locator("#version")).to_have_text(version)
    expect(page.locator("#backend")).to_have_text("bwrap")
    expect(page.locator("#isolation")).to_have_text("namespaces+seccomp")
    expect(page.locator("#card-status h2 .badge")).to_have_text(re.compile("ok|degraded"))
    expect(page.locator("#card-today [data-status]")).to_have_count(6)
    expect(page.locator("#card-resources meter")).to_have_count(3)
    cookies = {cookie["name"]: cookie for cookie in page.context.cookies()}
    session = cookies["nox_session"]
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert session["path"] == "/ui"
    assert token not in session["value"]  # encrypted, not only signed
    assert "nox_session" not in page.evaluate("document.cookie")  # HttpOnly: no script sees it
    page.click("#sign-out")
    page.wait_for_url(re.compile(r"/ui/login$"))
    assert "nox_session" not in {cookie["name"] for cookie in page.context.cookies()}
    page.goto("/ui/history")
    page.wait_for_url(re.compile(r"/ui/login\?next="))


def test_run_python_and_see_its_output(ui: Browsing) -> None:
    page = ui.page(ui.token("runner"))
    page.click("#nav-run")
    page.wait_for_url(re.compile(r"/ui/run$"))
    _run(
        page,
        "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\nsys.exit(3)",
        keys=True,
    )
    expect(page.locator("#stdout")).to_have_text("to stdout")
    expect(page.locator("#stderr")).to_have_text("to stderr")
    expect(page.locator("#exit-code")).to_have_text("3")
    expect(page.locator("#run-result")).to_have_attribute("data-status", "error")
    assert DURATION.match(page.locator("#duration").inner_text())
    assert page.url.endswith("/ui/run")  # no page load: the editor keeps its text
    expect(page.locator("#code")).to_have_value(re.compile(r"sys\.exit\(3\)$"))
    _run(page, "echo $((6 * 7)); echo oops >&2", kind="shell")
    expect(page.locator("#stdout")).to_have_text("42")
    expect(page.locator("#stderr")).to_have_text("oops")
    expect(page.locator("#run-result")).to_have_attribute("data-status", "ok")
    expect(page.locator("#exit-code")).to_have_text("0")


def test_drag_and_drop_two_files_then_view_download_and_delete(ui: Browsing) -> None:
    token = ui.token("runner")
    page = ui.page(token)
    page.click("a[href='/ui/files']")
    big = "b" * 300_000
    _drop(page, [("one.txt", "alpha\n"), ("two.txt", big)])
    expect(page.locator("#upload-progress li.ok")).to_have_count(2)
    done = page.locator("#upload-progress progress").evaluate_all(
        "bars => bars.map(bar => bar.value === bar.max)"
    )
    assert done == [True, True]
    expect(page.locator("#file-list tr[data-name='one.txt']")).to_be_visible()
    expect(page.locator("#file-list tr[data-name='two.txt'] td.num")).to_have_text("293.0 KiB")
    assert ui.server.api("GET", "/api/files/two.txt", token=token).text == big
    # view
    page.click("#file-list a.file:text-is('one.txt')")
    expect(page.locator("#file-text")).to_have_text("alpha")
    # download
    page.goto("/ui/files")
    with page.expect_download() as downloading:
        page.click("#file-list tr[data-name='two.txt'] a:has-text('Download')")
    download = downloading.value
    assert download.suggested_filename == "two.txt"
    assert Path(download.path()).read_text() == big
    # delete, after a confirmation
    page.click("#file-list tr[data-name='one.txt'] button:has-text('Delete')")
    expect(page.locator("#file-list tr[data-name='one.txt']")).to_have_count(0)
    expect(page.locator("#file-list .notice")).to_have_text("Deleted one.txt.")
    assert ui.dialogs == ["confirm: Delete one.txt?"]
    listed = ui.server.api("GET", "/api/files", token=token).json()["entries"]
    assert [entry["name"] for entry in listed] == ["two.txt"]


def test_history_lists_runs_and_reloads_a_past_run_into_the_editor(ui: Browsing) -> None:
    page = ui.page(ui.token("runner"))
    page.goto("/ui/run")
    _run(page, "print('first run')", keys=True)
    expect(page.locator("#stdout")).to_have_text("first run")
    _run(page, "print('second run')")
    expect(page.locator("#stdout")).to_have_text("second run")
    page.click("a[href='/ui/history']")
    rows = page.locator("table.history tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator("td").nth(5)).to_have_text(f"runner-{ui.workspace}")
    rows.nth(1).locator("a:has-text('Open')").click()
    expect(page.locator("#run-code")).to_have_text("print('first run')")
    expect(page.locator("#stdout")).to_have_text("first run")
    page.click("#load-run")
    page.wait_for_url(re.compile(r"/ui/run\?from="))
    expect(page.locator("#code")).to_have_value("print('first run')")
    page.press("#code", "Control+Enter")
    expect(page.locator("#stdout")).to_have_text("first run")
    page.goto("/ui/history")
    expect(rows).to_have_count(3)


def test_a_log_line_appears_live_and_pause_holds_it(ui: Browsing) -> None:
    page = ui.page(ui.token("admin"))
    page.click("a[href='/ui/logs']")
    expect(page.locator("#log-state")).to_have_text("Live")
    lines = page.locator("#log-lines li")
    seen = None
    # The stream subscribes a moment after its headers left: a line logged in between is not
    # sent, so a missed first line is tried again with another one (a few at most).
    for attempt in range(5):
        name = f"live-{ui.workspace}-{attempt}"
        http_sign_in(ui.server, ui.token("viewer", name=name))
        try:
            expect(lines.filter(has_text=f"{name} (viewer) signed in")).to_have_count(
                1, timeout=3000
            )
        except AssertionError:
            continue
        seen = name
        break
    assert seen is not None, "no sign-in line reached the live log"
    page.click("#log-pause")
    expect(page.locator("#log-pause")).to_have_text("Resume")
    held = f"held-{ui.workspace}"
    http_sign_in(ui.server, ui.token("viewer", name=held))
    expect(page.locator("#log-state")).to_have_text(re.compile(r"Paused · \d+ new"))
    page.wait_for_timeout(500)
    expect(lines.filter(has_text=f"{held} (viewer) signed in")).to_have_count(0)
    page.click("#log-pause")
    expect(lines.filter(has_text=f"{held} (viewer) signed in")).to_have_count(1)
    expect(page.locator("#log-state")).to_have_text("Live")


def test_admin_creates_a_token_sees_its_secret_once_and_revokes_it(ui: Browsing) -> None:
    page = ui.page(ui.token("admin"))
    page.click("a[href='/ui/admin/tokens']")
    name = f"made-{ui.workspace}"
    page.fill("#token-form input[name=name]", name)
    page.select_option("#token-form select[name=role]", "viewer")
    page.fill("#token-form input[name=workspace]", ui.workspace)
    page.click("#token-form button[type=submit]")
    secret = page.locator("#new-secret").input_value()
    assert secret.startswith("nox_")
    me = ui.server.api("GET", "/api/me", token=secret)
    assert me.status_code == 200
    assert me.json()["name"] == name
    assert me.json()["role"] == "viewer"
    row = page.locator(f"tr[data-token='{me.json()['id']}']")
    expect(row.locator(".state")).to_have_text("active")
    page.reload()
    expect(page.locator("#new-secret")).to_have_count(0)
    assert secret not in page.content()  # shown that once only
    row.locator("button:has-text('Revoke')").click()
    expect(row.locator(".state")).to_have_text("revoked")
    assert ui.dialogs == [f"confirm: Revoke token {name}? It stops working at once."]
    assert ui.server.api("GET", "/api/me", token=secret).status_code == 401
    page.click("a[href='/ui/admin/audit']")
    expect(page.locator("#audit-verify")).to_have_attribute("data-ok", "true")
    actions = page.locator("table.audit tbody tr td:nth-child(3)").all_inner_texts()
    assert "token.revoke" in actions
    assert "token.create" in actions


def test_a_viewer_sees_no_run_button_and_its_forced_post_is_refused(ui: Browsing) -> None:
    runner = ui.token("runner")
    ui.server.api("PUT", "/api/files/seen.txt", token=runner, content=b"seen")
    ran = ui.server.api("POST", "/run_py", token=runner, json={"code": "print(1)"}).json()
    page = ui.page(ui.token("viewer"))
    expect(page.locator("#my-role")).to_have_text("viewer")
    expect(page.locator("#nav-run")).to_have_count(0)
    expect(page.get_by_role("button", name="Run")).to_have_count(0)
    page.goto("/ui/files")
    expect(page.locator("#file-list tr[data-name='seen.txt']")).to_be_visible()
    expect(page.locator("#upload")).to_have_count(0)
    expect(page.get_by_role("button", name="Delete")).to_have_count(0)
    page.goto(f"/ui/history/{ran['id']}")
    expect(page.locator("#run-code")).to_have_text("print(1)")
    expect(page.locator("#load-run")).to_have_count(0)
    assert page.goto("/ui/run").status == 403
    expect(page.locator(".error")).to_contain_text("the viewer role may not do this")
    page.goto("/ui")
    csrf = page.locator("meta[name=csrf-token]").get_attribute("content")
    assert csrf
    forced = page.evaluate(
        """async (csrf) => {
            const body = new FormData();
            body.append('csrf', csrf);
            body.append('code', "print('forced')");
            const answer = await fetch('/ui/run', {method: 'POST', body});
            return [answer.status, await answer.text()];
        }""",
        csrf,
    )
    assert forced[0] == 403
    assert "needs run" in forced[1]
    deleted = page.evaluate(
        """async (csrf) => (await fetch('/ui/files/delete', {method: 'POST',
            headers: {'X-CSRF-Token': csrf},
            body: new URLSearchParams({path: 'seen.txt'})})).status""",
        csrf,
    )
    assert deleted == 403
    history = ui.server.api("GET", "/api/history", token=runner).json()
    assert history["total"] == 1
    assert ui.server.api("GET", "/api/files/seen.txt", token=runner).status_code == 200


def test_xss_payloads_render_inert(ui: Browsing) -> None:
    runner = ui.token("runner")
    named = "<img src=x onerror=alert(1)>.txt"
    put = ui.server.api(
        "PUT", "/api/files/" + quote(named), token=runner, content=b"<script>alert(2)</script>"
    )
    assert put.status_code == 201
    # A '/' cannot be part of a name: this makes the folder '<script>alert(1)<' with 'script>'.
    nested = "<script>alert(1)</script>"
    put = ui.server.api("PUT", "/api/files/" + quote(nested, safe="/"), token=runner, content=b"x")
    assert put.status_code == 201
    page = ui.page(runner)
    page.goto("/ui/files")
    _drop(page, [("<svg onload=alert(3)>.txt", "dropped")])
    expect(page.locator("#upload-progress li.ok")).to_have_count(1)
    names = page.locator("#file-list td.name a")
    expect(names).to_have_text(["<script>alert(1)</", "<img src=x onerror=alert(1)>.txt",
                                "<svg onload=alert(3)>.txt"])  # fmt: skip
    assert page.locator("#file-list img, #file-list script, #file-list svg").count() == 0
    names.nth(0).click()
    expect(page.locator(".crumbs")).to_contain_text("<script>alert(1)<")
    expect(page.locator("#file-list td.name a")).to_have_text(["script>"])
    page.goto("/ui/files/view?path=" + quote(named))
    expect(page.locator("h1.filename")).to_have_text(named)
    expect(page.locator("#file-text")).to_have_text("<script>alert(2)</script>")
    page.goto("/ui/run")
    shown = "<script>alert(4)</script><img src=x onerror=alert(5)>"
    _run(page, f"import sys\nprint({shown!r})\nprint({shown!r}, file=sys.stderr)", keys=True)
    expect(page.locator("#stdout")).to_have_text(shown)
    expect(page.locator("#stderr")).to_have_text(shown)
    assert page.locator("#result img, #result script").count() == 0
    page.click("#run-result a[href^='/ui/history/']")
    expect(page.locator("#stdout")).to_have_text(shown)
    expect(page.locator("#run-code")).to_contain_text("alert(4)")
    assert page.locator("main img, main script, main svg").count() == 0
    page.wait_for_timeout(300)  # time for an injected handler to have fired
    assert ui.dialogs == []


@contextmanager
def _attacker_site(target: str) -> Iterator[str]:
    """A page on another origin of this machine that posts a form to the dashboard at once, as a
    malicious site would (it cannot know the session's CSRF token)."""
    html = (
        "<!doctype html><form id=f method=post action='" + target + "/ui/run'>"
        "<input name=code value=\"print('csrf')\"><input name=kind value=python></form>"
        "<script>document.getElementById('f').submit()</script>"
    ).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_posts_without_the_csrf_token_are_refused(ui: Browsing) -> None:
    runner = ui.token("runner")
    page = ui.page(runner)
    status = page.evaluate(
        """async () => (await fetch('/ui/run', {method: 'POST',
            body: new URLSearchParams({code: "print('no token')"})})).status"""
    )
    assert status == 403
    wrong = page.evaluate(
        """async () => (await fetch('/ui/run', {method: 'POST',
            headers: {'X-CSRF-Token': 'f'.repeat(64)},
            body: new URLSearchParams({code: "print('wrong token')"})})).status"""
    )
    assert wrong == 403
    signed_out = page.evaluate("async () => (await fetch('/ui/logout', {method: 'POST'})).status")
    assert signed_out == 403
    with _attacker_site(ui.server.url) as attacker:
        with page.expect_response(lambda r: r.url.endswith("/ui/run")) as answer:
            page.goto(attacker)
        assert answer.value.status == 403
    expect(page.locator(".error")).to_contain_text("CSRF token is missing or wrong")
    assert ui.server.api("GET", "/api/history", token=runner).json()["total"] == 0
    page.goto("/ui")  # still signed in: the refused sign-out changed nothing
    expect(page.locator("#my-role")).to_have_text("runner")


PAGES = [
    ("home", "/ui"),
    ("files", "/ui/files"),
    ("file-view", "/ui/files/view?path=notes.txt"),
    ("run", "/ui/run"),
    ("history", "/ui/history"),
    ("run-detail", None),
    ("logs", "/ui/logs"),
    ("admin-tokens", "/ui/admin/tokens"),
    ("admin-audit", "/ui/admin/audit"),
    ("admin-backups", "/ui/admin/backups"),
    ("admin-policy", "/ui/admin/policy"),
]


def test_every_page_at_desktop_and_phone_size(ui: Browsing, tmp_path: Path) -> None:
    """A screenshot of each page at 1280x800 and 390x844 (under this test's temporary folder),
    and no page wider than the screen."""
    admin = ui.token("admin")
    ui.server.api("PUT", "/api/files/notes.txt", token=admin, content=b"hello\nfrom nox\n" * 20)
    ran = ui.server.api("POST", "/run_py", token=admin, json={"code": "print('hello')"}).json()
    shots: list[Path] = []
    for label, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page = ui.page(viewport=viewport)
        shots.append(tmp_path / f"{label}-00-login.png")
        page.screenshot(path=shots[-1], full_page=True)
        page.fill("#token", admin)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/ui$"))
        for number, (name, url) in enumerate(PAGES, start=1):
            page.goto(url or f"/ui/history/{ran['id']}")
            if name == "run":
                _run(page, "print('hello, world')", keys=True)
                expect(page.locator("#stdout")).to_have_text("hello, world")
            if name == "admin-tokens":
                page.fill("#token-form input[name=name]", f"shot-{label}-{ui.workspace}")
                page.click("#token-form button[type=submit]")
                expect(page.locator("#new-secret")).to_have_value(re.compile("^nox_"))
            if name == "admin-backups" and label == "desktop":
                page.fill("#backups input[name=name]", f"shot-{ui.workspace}")
                page.click("#backups button:has-text('Create backup')")
                expect(page.locator("#backups .notice")).to_contain_text("written")
            if name == "admin-policy":
                page.click("#policy-reload")
                expect(page.locator("#policy .notice")).to_have_text("Policy reloaded.")
            wide = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert wide <= 0, f"{name} is {wide} px wider than the {label} screen"
            shots.append(tmp_path / f"{label}-{number:02d}-{name}.png")
            page.screenshot(path=shots[-1], full_page=True)
    assert all(shot.stat().st_size > 5000 for shot in shots)
    assert len(shots) == 2 * (len(PAGES) + 1)
    print(f"\nscreenshots: {tmp_path}")
