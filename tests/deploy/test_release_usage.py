"""``deploy/release.sh``'s refusals, before it touches anything: bad settings (exit 2) and a
release already under way (exit 3). No server or proxy is started."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest
from tests.deploy._stack import DEPLOY

pytestmark = pytest.mark.deploy


def _release(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    upstream = tmp_path / "upstream.caddy"
    if not upstream.exists():
        upstream.write_text("to 127.0.0.1:18081\n")
    base = {
        "PATH": os.environ["PATH"],
        "NOX_RELEASE_CONFIG": str(tmp_path / "none"),
        "NOX_RELEASE_MANAGER": "process",
        "NOX_RELEASE_HOME": str(tmp_path / "opt"),
        "NOX_RELEASE_STATE_DIR": str(tmp_path / "state"),
        "NOX_RELEASE_UPSTREAM_FILE": str(upstream),
        "NOX_RELEASE_PROXY_URL": "http://127.0.0.1:1",
        "NOX_RELEASE_TOKEN": "t",
        "NOX_BLUE_PORT": "18081",
        "NOX_GREEN_PORT": "18082",
    }
    return subprocess.run(
        [str(DEPLOY / "release.sh"), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"NOX_RELEASE_PROXY": "haproxy"}, (), "NOX_RELEASE_PROXY must be caddy or nginx"),
        ({"NOX_RELEASE_MANAGER": "docker"}, (), "NOX_RELEASE_MANAGER must be systemd or process"),
        ({"NOX_RELEASE_PROXY_URL": ""}, (), "set NOX_RELEASE_PROXY_URL"),
        ({}, ("--to", "red"), "a colour is blue or green, not 'red'"),
        ({}, ("--to", "blue"), "blue is the live colour already"),
        ({"NOX_BLUE_PORT": "18083"}, (), "names port '18081', neither blue's (18083)"),
        (
            {"NOX_RELEASE_TOKEN": "", "NOX_RELEASE_TOKEN_FILE": "/nonexistent/token"},
            (),
            "no token for /api/health/detailed",
        ),
        ({}, ("restart",), "unknown command restart"),
    ],
)
def test_bad_settings_exit_2(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    done = _release(tmp_path, *args, **env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert (tmp_path / "upstream.caddy").read_text() == "to 127.0.0.1:18081\n"


def test_a_second_release_waits_for_none(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with (state / "release.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = _release(tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "another release is running" in done.stderr


def test_a_missing_build_is_refused_and_nothing_switched(tmp_path: Path) -> None:
    done = _release(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED: green could not be started" in done.stderr
    assert "bin/nox-api is not an executable" in done.stderr
    assert (tmp_path / "upstream.caddy").read_text() == "to 127.0.0.1:18081\n"
