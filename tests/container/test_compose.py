"""docker-compose.yml: its shape (loopback ports, the data volume, the profiles and the files
they load), then the real thing with podman-compose: ``up -d`` of Nox (and of Redis from the
``redis`` profile), health polled from the host, code run in a sandbox, ``down``.

podman-compose 1.0.3 (Debian 12) ignores ``profiles``: the tests name the services they start,
as docs/deploy.md tells its users to. No registry is reachable here: Nox's image is the one the
session built, Redis's a stand-in built from Debian's redis-server (NOX_REDIS_IMAGE)."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml
from tests.conftest import free_port
from tests.container._podman import REPO, first_admin_token, podman, tool, wait_health

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

COMPOSE = REPO / "docker-compose.yml"
REDIS_STANDIN = "localhost/nox-test-redis:standin"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def test_compose_file_shape() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"nox", "prometheus", "grafana", "redis", "postgres"}
    nox = services["nox"]
    assert "profiles" not in nox  # `up` without a profile starts Nox
    assert nox["build"]["context"] == "."
    assert nox["volumes"] == ["nox-data:/data"]
    assert "systempaths=unconfined" in nox["security_opt"]
    profiles = {name: svc.get("profiles") for name, svc in services.items() if name != "nox"}
    assert profiles == {
        "prometheus": ["monitoring"], "grafana": ["monitoring"], "redis": ["redis"],
        "postgres": ["postgres"],
    }  # fmt: skip
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).is_file(), f"{name} mounts {source}, which is missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
    # Every variable Nox takes from compose's environment is a setting of docs/configuration.md.
    documented = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for variable in nox["environment"]:
        assert f"`{variable}`" in documented, variable
    assert (REPO / compose["secrets"]["nox_metrics_token"]["file"]).parent.is_dir()


def test_monitoring_profile_prometheus_config(tmp_path: Path) -> None:
    """deploy/container/prometheus.yml scrapes the compose service nox with the secret's token;
    promtool accepts it with observability's alert rules next to it."""
    config = yaml.safe_load((REPO / "deploy/container/prometheus.yml").read_text())
    nox = next(job for job in config["scrape_configs"] if job["job_name"] == "nox")
    assert [t for s in nox["static_configs"] for t in s["targets"]] == ["nox:8080"]
    secret = "/run/secrets/nox_metrics_token"
    assert nox["authorization"]["credentials_file"] == secret
    assert "nox_metrics_token" in _compose()["services"]["prometheus"]["secrets"]

    token = tmp_path / "nox_metrics_token"
    token.write_text("a-scrape-token-for-the-check\n")
    text = (REPO / "deploy/container/prometheus.yml").read_text()
    (tmp_path / "prometheus.yml").write_text(text.replace(secret, str(token)))
    shutil.copy(REPO / "observability/prometheus/alerts.yml", tmp_path / "alerts.yml")
    done = subprocess.run(
        [tool("promtool"), "check", "config", "prometheus.yml"], cwd=tmp_path,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout + done.stderr


@contextmanager
def _project(env: dict[str, str], *services: str) -> Iterator[str]:
    """``podman-compose up -d SERVICES`` in a project of its own; ``down -v`` at the end (and
    the project's network, which podman-compose 1.0.3 leaves behind)."""
    project = f"noxtest{uuid.uuid4().hex[:8]}"
    base = [tool("podman-compose"), "--project-name", project, "--file", str(COMPOSE)]

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
            check=False,
        )  # fmt: skip

    up = compose("up", "-d", *services)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield project
    finally:
        down = compose("down", "-v")
        podman(env, "network", "rm", "--force", f"{project}_default", check=False)
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        left = podman(env, "ps", "--all", "--quiet", "--filter", f"name={project}_").stdout
        assert left.strip() == "", f"containers left after down: {left}"
        volumes = podman(env, "volume", "ls", "--quiet").stdout.split()
        assert f"{project}_nox-data" not in volumes


def test_compose_up_runs_code_and_down(podman_environ: dict[str, str], image: str) -> None:
    port = free_port()
    env = {**podman_environ, "NOX_IMAGE": image, "NOX_PUBLISH_PORT": str(port)}
    env.pop("NOX_API_TOKEN", None)
    started = time.monotonic()
    with _project(env, "nox") as project:
        url = f"http://127.0.0.1:{port}"
        wait_health(url)
        up_s = time.monotonic() - started
        logs = podman(env, "logs", f"{project}_nox_1").stdout
        auth = {"Authorization": f"Bearer {first_admin_token(logs)}"}
        detailed = httpx.get(f"{url}/api/health/detailed", headers=auth, timeout=10).json()
        assert detailed["checks"]["sandbox"]["status"] == "ok", detailed
        code = "import os; print(os.getuid(), os.path.exists('/data'))"
        run = httpx.post(f"{url}/run_py", json={"code": code}, headers=auth, timeout=30).json()
        assert run["status"] == "ok", run
        assert run["stdout"] == "65534 False\n"
        # The data volume is the project's named volume, owned by the image's nox user.
        volume = f"{project}_nox-data"
        mountpoint = podman(env, "volume", "inspect", "--format", "{{.Mountpoint}}", volume)
        assert (Path(mountpoint.stdout.strip()) / "nox.db").is_file()
    assert up_s < 60


@pytest.fixture(scope="session")
def redis_standin(podman_environ: dict[str, str]) -> str:
    podman(
        podman_environ, "build", "--tag", REDIS_STANDIN, "--file",
        str(Path(__file__).with_name("redis-standin.Containerfile")), str(REPO / "tests/container"),
        timeout=600,
    )  # fmt: skip
    return REDIS_STANDIN


def test_compose_redis_profile(
    podman_environ: dict[str, str], image: str, redis_standin: str
) -> None:
    """With the redis service and NOX_REDIS_URL, Nox keeps its rate-limit windows in Redis."""
    port = free_port()
    token = "compose-test-token-0123456789abcdef"
    env = {
        **podman_environ, "NOX_IMAGE": image, "NOX_PUBLISH_PORT": str(port),
        "NOX_REDIS_IMAGE": redis_standin, "NOX_REDIS_URL": "redis://redis:6379/0",
        "NOX_API_TOKEN": token,
    }  # fmt: skip
    with _project(env, "redis", "nox") as project:
        url = f"http://127.0.0.1:{port}"
        wait_health(url)
        auth = {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + 30
        keys = ""
        while time.monotonic() < deadline and not keys:
            resp = httpx.get(f"{url}/api/me", headers=auth, timeout=10)
            assert resp.status_code == 200, resp.text
            keys = podman(
                env, "exec", f"{project}_redis_1", "redis-cli", "--scan", check=False
            ).stdout.strip()
            if not keys:
                time.sleep(0.5)
        assert keys, "no rate-limit window in Redis after requests to Nox"
