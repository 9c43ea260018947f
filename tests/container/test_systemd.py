"""deploy/ under a real systemd: an image with systemd as PID 1 where deploy/install.sh ran as on
a host, both colours of the template unit enabled. The container boots, nox-api@blue (8081) and
nox-api@green (8082) start under the unit's hardening, and both answer and run code in real
sandboxes (curl inside the container: the unit binds loopback)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from tests.container._podman import REPO, podman

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

SYSTEMD_IMAGE = "localhost/nox-api-systemd:test"
PORTS = {"blue": 8081, "green": 8082}


def _wait(env: dict[str, str], name: str, timeout_s: float = 90) -> str:
    """Wait until systemd finished booting (``running``, or ``degraded`` with the reason)."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = podman(
            env, "exec", name, "systemctl", "is-system-running", check=False
        ).stdout.strip()
        if state in ("running", "degraded"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"systemd did not finish booting in {timeout_s} s: {state!r}")


def _curl(env: dict[str, str], name: str, *args: str) -> str:
    done = podman(env, "exec", name, "curl", "--silent", "--show-error", "--max-time", "20", *args)
    return done.stdout


def test_blue_and_green_under_systemd(podman_environ: dict[str, str], image: str) -> None:
    env = podman_environ
    podman(
        env, "build", "--format", "docker", "--tag", SYSTEMD_IMAGE, "--build-arg",
        f"NOX_IMAGE={image}", "--file", str(Path(__file__).with_name("systemd.Containerfile")),
        str(REPO / "deploy"), timeout=600,
    )  # fmt: skip
    name = f"nox-systemd-{uuid.uuid4().hex[:10]}"
    podman(
        env, "run", "--detach", "--name", name, "--systemd", "always", "--health-interval",
        "disable", "--security-opt", "systempaths=unconfined", SYSTEMD_IMAGE,
    )  # fmt: skip
    try:
        state = _wait(env, name)
        failed = podman(env, "exec", name, "systemctl", "--failed", "--no-legend", check=False)
        assert state == "running", f"systemd is {state}: {failed.stdout}"
        viewer = podman(env, "exec", name, "cat", "/etc/nox/release.token").stdout.strip()
        runner = podman(
            env, "exec", "--user", "nox", name, "env", "NOX_DATA_DIR=/var/lib/nox", "nox-api",
            "token", "create", "--role", "runner", "--name", "systemd-test",
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        for colour, port in PORTS.items():
            unit = f"nox-api@{colour}.service"
            shown = podman(
                env, "exec", name, "systemctl", "show", "--property", "ActiveState,User", unit
            ).stdout
            assert "ActiveState=active" in shown, shown
            assert "User=nox" in shown, shown
            deadline = time.monotonic() + 60
            while True:  # the unit is active before uvicorn listens
                health = podman(
                    env, "exec", name, "curl", "-s", f"http://127.0.0.1:{port}/health", check=False
                )
                if health.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert json.loads(health.stdout)["status"] == "ok", health.stdout
            detailed = json.loads(
                _curl(env, name, "-H", f"Authorization: Bearer {viewer}",
                      f"http://127.0.0.1:{port}/api/health/detailed")
            )  # fmt: skip
            assert detailed["status"] == "ok", (colour, detailed)
            assert detailed["checks"]["sandbox"]["backend"] == "bwrap"
            code = json.dumps({"code": "import os; print(os.getuid(), os.listdir('/workspace'))"})
            run = json.loads(
                _curl(env, name, "-H", f"Authorization: Bearer {runner}", "-H",
                      "Content-Type: application/json", "--data", code,
                      f"http://127.0.0.1:{port}/run_py")
            )  # fmt: skip
            assert run["status"] == "ok", (colour, run)
            assert run["stdout"].startswith("65534 "), run
        # The server's own processes run as nox, in the unit's cgroup.
        main_pid = podman(
            env, "exec", name, "systemctl", "show", "--property", "MainPID", "--value",
            "nox-api@blue.service",
        ).stdout.strip()  # fmt: skip
        owner = podman(env, "exec", name, "stat", "-c", "%U", f"/proc/{main_pid}").stdout.strip()
        assert owner == "nox"
        stopped = podman(env, "exec", name, "systemctl", "stop", "nox-api@blue.service")
        assert stopped.returncode == 0
        after = podman(
            env, "exec", name, "systemctl", "show", "--property", "ActiveState,Result",
            "nox-api@blue.service",
        ).stdout  # fmt: skip
        assert "ActiveState=inactive" in after, after
        assert "Result=success" in after, after
    finally:
        podman(env, "rm", "--force", "--volumes", "--time", "10", name, check=False)
