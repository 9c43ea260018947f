"""``deploy/release.sh`` against two real Nox servers behind a real Caddy and a real nginx (the
shipped configurations) on loopback, with a bounded load running through every switch."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from tests.deploy._stack import ADMIN_TOKEN, Load, Stack, make_colour, running_stack

pytestmark = [pytest.mark.deploy, pytest.mark.sandbox]


def _colour_running(stack: Stack, colour: str) -> bool:
    status = stack.release("status")
    assert status.returncode == 0, status.stderr
    return f"{colour}: running" in status.stdout


def _check_stream_and_upload_limit(stack: Stack) -> None:
    """Through the proxy: a Server-Sent Events stream delivers its events at once (nothing
    buffered), and an upload above NOX_MAX_UPLOAD_BYTES gets Nox's own JSON 413."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(verify=stack.verify, timeout=10, headers=headers) as client:
        url = f"{stack.url}/api/logs/stream?duration_s=20"
        with client.stream("GET", url) as events:
            assert events.status_code == 200
            assert events.headers["content-type"].startswith("text/event-stream")
            started = time.monotonic()
            lines = events.iter_lines()
            assert next(lines) == ": connected"
            # a failed sign-in logs a line; its event must come through while the stream is open
            client.get(f"{stack.url}/api/me", headers={"Authorization": "Bearer nox_wrong"})
            data = next(line for line in lines if line.startswith("data:"))
            assert time.monotonic() - started < 5, "events were held back by the proxy"
            assert data
        too_big = int(stack.env["NOX_MAX_UPLOAD_BYTES"]) + 1
        resp = client.put(f"{stack.url}/api/files/big.bin", content=b"x" * too_big)
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "payload_too_large"


@pytest.fixture(params=["caddy", "nginx"])
def stack(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[Stack]:
    assert shutil.which(request.param), f"{request.param} must be installed (scripts/setup.sh)"
    work = Path(tempfile.mkdtemp(prefix=f"nox-deploy-{request.param}-"))
    try:
        with running_stack(request.param, work, data_dir) as stack:
            yield stack
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_release_switches_under_load_and_rolls_back_failures(stack: Stack) -> None:
    home = Path(stack.env["NOX_RELEASE_HOME"])
    blue_port, green_port = stack.env["NOX_BLUE_PORT"], stack.env["NOX_GREEN_PORT"]
    assert stack.get("/health").json()["version"] == "1.0.0-blue"
    _check_stream_and_upload_limit(stack)

    # 1. blue -> green under load: no request fails, green answers afterwards, blue is stopped
    with Load(stack.url, stack.verify) as load:
        time.sleep(1)
        started = time.monotonic()
        done = stack.release()
        took = time.monotonic() - started
        time.sleep(1)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "released: green is live" in done.stdout
    assert load.failures == [], load.failures[:5]
    # kept-alive connections the reload closed under a request: resent once, and rare
    assert len(load.resent) <= max(2, load.total // 100), load.resent[:5]
    assert load.answered_by[f"127.0.0.1:{blue_port}"] > 0
    assert load.answered_by[f"127.0.0.1:{green_port}"] > 0
    assert set(load.versions) == {"1.0.0-blue", "2.0.0-green"}
    after = stack.get("/health")
    assert after.json()["version"] == "2.0.0-green"
    assert after.headers["x-nox-upstream"] == f"127.0.0.1:{green_port}"
    assert green_port in stack.upstream_file.read_text()
    assert not _colour_running(stack, "blue")
    print(
        f"{stack.kind}: release took {took:.1f} s, {load.total} requests, 0 failed, "
        f"{len(load.resent)} resent on a closed kept-alive connection"
    )

    # 2. a build whose detailed health answers 503: rolled back, traffic untouched
    make_colour(home, "blue", "3.0.0-blue", broken="unhealthy")
    before = stack.upstream_file.read_text()
    with Load(stack.url, stack.verify) as load:
        refused = stack.release()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert re.search(
        r"FAILED: blue answered fail 5 times in a row: .* HTTP 503, status fail: .*\"disk\"",
        refused.stderr,
    )
    assert "nothing was switched" in refused.stderr
    assert load.failures == [], load.failures[:5]
    assert set(load.versions) == {"2.0.0-green"}
    assert stack.upstream_file.read_text() == before
    assert stack.get("/health").json()["version"] == "2.0.0-green"
    assert not _colour_running(stack, "blue")
    assert _colour_running(stack, "green")

    # 3. a build that cannot even start
    make_colour(home, "blue", "3.0.0-blue", broken="exit")
    refused = stack.release()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "FAILED: blue stopped during start-up" in refused.stderr
    assert "this build is broken" in refused.stderr
    assert stack.get("/health").json()["version"] == "2.0.0-green"

    # 4. a healthy build, but the proxy's reload fails: the upstream file is restored, the new
    # colour stopped, the old one keeps serving
    make_colour(home, "blue", "3.0.0-blue")
    before = stack.upstream_file.read_text()
    stack.env["NOX_RELEASE_RELOAD"] = "echo 'reload: admin endpoint refused' >&2; exit 1"
    with Load(stack.url, stack.verify) as load:
        refused = stack.release()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "FAILED: the proxy reload failed" in refused.stderr
    assert "admin endpoint refused" in refused.stderr
    assert "the proxy is back on green and blue is stopped" in refused.stderr
    assert load.failures == [], load.failures[:5]
    assert set(load.versions) == {"2.0.0-green"}
    assert stack.upstream_file.read_text() == before
    assert stack.get("/health").json()["version"] == "2.0.0-green"
    assert not _colour_running(stack, "blue")
