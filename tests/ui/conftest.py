"""Fixtures of the dashboard's tests.

In-process tests sign in through the real forms with the TestClient (fake sandbox). Browser tests
drive Debian's Chromium with Playwright against one real ``nox-api serve`` on 127.0.0.1 with the
real bubblewrap sandbox, shared by the module; each test signs its users in with tokens of a
workspace of its own, so tests do not see each other's files and runs.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from tests.conftest import SANDBOX_ROOT, free_port, nox_serve

from nox_api.config import load_settings
from nox_api.services.tokens import Role, TokenService
from nox_api.storage.db import Database

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
BACKUP_KEY = "cd" * 32
_CSRF_META = re.compile(r'<meta name="csrf-token" content="([0-9a-f]*)">')
_LOGIN_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_workspaces = itertools.count(1)


# --- in-process ---------------------------------------------------------------------------------


def csrf_of(html: str) -> str:
    """The session's CSRF token, as every page carries it."""
    found = _CSRF_META.search(html)
    assert found is not None, "the page has no CSRF token"
    assert found.group(1), "the page's CSRF token is empty"
    return found.group(1)


def sign_in(client: TestClient, token: str) -> str:
    """Sign ``client`` in through the sign-in form; return the session's CSRF token."""
    form = client.get("/ui/login")
    assert form.status_code == 200, form.text
    found = _LOGIN_CSRF.search(form.text)
    assert found is not None
    done = client.post(
        "/ui/login",
        data={"token": token, "csrf": found.group(1), "next": "/ui"},
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text
    home = client.get("/ui")
    assert home.status_code == 200, home.text
    return csrf_of(home.text)


# --- a real server and a real browser -------------------------------------------------------------


@dataclass
class UiServer:
    """The shared ``nox-api serve`` of the browser tests."""

    url: str
    admin_token: str
    data_dir: Path

    def api(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        return httpx2.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def token(self, role: str, workspace: str, name: str | None = None) -> str:
        """A new token, made through ``POST /api/tokens``."""
        body = {"name": name or f"{role}-{workspace}", "role": role, "workspace": workspace}
        resp = self.api("POST", "/api/tokens", json=body)
        assert resp.status_code == 201, resp.text
        secret: str = resp.json()["token"]
        return secret


@pytest.fixture(scope="module")
def ui_server() -> Iterator[UiServer]:
    folder = Path(tempfile.mkdtemp(prefix="nox-ui-", dir=os.path.realpath(SANDBOX_ROOT)))
    folder.chmod(0o711)
    settings = load_settings(data_dir=folder)
    db = Database(settings.sqlalchemy_url)
    db.migrate()
    try:
        admin = TokenService(db).create("ui-admin", Role.ADMIN).secret
    finally:
        db.close()
    port = free_port()
    try:
        with nox_serve(folder, port, NOX_BACKUP_KEY=BACKUP_KEY):
            server = UiServer(f"http://127.0.0.1:{port}", admin, folder)
            health = server.api("GET", "/api/health/detailed").json()
            assert health["checks"]["sandbox"]["status"] == "ok", health
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the dashboard's browser tests drive Debian's Chromium. "
            "Install it with 'apt-get install chromium' (make test's scripts/setup.sh does)."
        )
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()
    finally:
        playwright.stop()


@dataclass
class Browsing:
    """Opens signed-in pages for one test and keeps what went wrong in them."""

    server: UiServer
    browser: Any
    workspace: str
    problems: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    contexts: list[Any] = field(default_factory=list)

    def page(self, token: str | None = None, viewport: dict[str, int] | None = None) -> Any:
        """A new browser (its own cookies) on the sign-in page, signed in with ``token``."""
        context = self.browser.new_context(base_url=self.server.url, viewport=viewport or DESKTOP)
        context.set_default_timeout(15_000)
        self.contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("console", self._console)
        page.on("dialog", self._dialog)
        page.goto("/ui/login")
        if token is not None:
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_url(re.compile(r"/ui$"))
        return page

    def token(self, role: str, name: str | None = None) -> str:
        return self.server.token(role, self.workspace, name)

    def _console(self, message: Any) -> None:
        text = message.text
        if "Content Security Policy" in text or "Refused to" in text:
            self.problems.append(f"console: {text}")

    def _dialog(self, dialog: Any) -> None:
        # Confirmations are accepted; an alert() would be script that should not have run.
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        if dialog.type == "confirm":
            dialog.accept()
        else:
            dialog.dismiss()


@pytest.fixture
def ui(ui_server: UiServer, browser: Any) -> Iterator[Browsing]:
    browsing = Browsing(ui_server, browser, f"ui{next(_workspaces)}")
    try:
        yield browsing
    finally:
        for context in browsing.contexts:
            context.close()
    assert browsing.problems == [], browsing.problems
    assert not [d for d in browsing.dialogs if not d.startswith("confirm")], browsing.dialogs


def http_sign_in(server: UiServer, token: str) -> None:
    """Sign in through the form with a plain HTTP client (no browser)."""
    with httpx2.Client(base_url=server.url, timeout=30) as client:
        form = client.get("/ui/login")
        found = _LOGIN_CSRF.search(form.text)
        assert found is not None
        done = client.post("/ui/login", data={"token": token, "csrf": found.group(1)})
        assert done.status_code == 303, done.text
