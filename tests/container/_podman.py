"""Podman for the container tests: the base image made by ``deploy/container/make-base.sh``
(debootstrap, no registry), the image of the top-level ``Dockerfile``, containers started from it
with their port published on 127.0.0.1, and ``podman-compose``.

This machine's podman needs runc and explicit ulimits (the defaults ask for more open files
than the machine allows): both go into a ``containers.conf`` of the test's own, named by
``CONTAINERS_CONF`` for podman and for the podman that podman-compose starts."""

from __future__ import annotations

import os
import re
import resource
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx

__all__ = [
    "Container",
    "IMAGE",
    "REPO",
    "build_image",
    "ca_bundle",
    "first_admin_token",
    "podman",
    "podman_env",
    "running",
    "tool",
    "wait_health",
]

REPO = Path(__file__).resolve().parents[2]
IMAGE = "nox-api:test"
_TOKEN = re.compile(r"keep it safe:\s+(\S+)")


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert path, f"{name} must be installed (NOX_SETUP_FOR=test scripts/setup.sh installs it)"
    return path


def podman_env(folder: Path) -> dict[str, str]:
    """The environment for podman and podman-compose: a containers.conf with runc and ulimits
    this machine grants (the hard limits of this process, at most 4096 processes)."""
    _, nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    nproc = 4096 if nproc == resource.RLIM_INFINITY else min(nproc, 4096)
    nofile = 1 << 20 if nofile == resource.RLIM_INFINITY else nofile
    conf = folder / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(
    env: dict[str, str], *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [tool("podman"), *args], env=env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr[-3000:]}"
    return done


def ca_bundle() -> Path | None:
    """The CA bundle this machine's pip uses (an intercepting proxy's CA may be in it only):
    handed to the build as the secret ``ca_bundle``; the image does not keep it."""
    candidates = [
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        ssl.get_default_verify_paths().openssl_cafile,
        "/etc/ssl/certs/ca-certificates.crt",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def build_image(env: dict[str, str]) -> dict[str, float]:
    """The base image (cached by make-base.sh), then ``podman build`` of the Dockerfile in the
    Docker format (the OCI format has no HEALTHCHECK). Returns the seconds each took."""
    times: dict[str, float] = {}
    started = time.monotonic()
    base = subprocess.run(
        [str(REPO / "deploy/container/make-base.sh")], env=env, capture_output=True, text=True,
        timeout=900, check=False,
    )  # fmt: skip
    assert base.returncode == 0, base.stdout + base.stderr
    times["base"] = time.monotonic() - started
    args = ["build", "--format", "docker", "--tag", IMAGE, "--file", "Dockerfile"]
    bundle = ca_bundle()
    if bundle is not None:
        args += ["--secret", f"id=ca_bundle,src={bundle}"]
    started = time.monotonic()
    podman(env, *args, str(REPO), timeout=1800)
    times["build"] = time.monotonic() - started
    return times


def first_admin_token(logs: str) -> str:
    found = _TOKEN.search(logs)
    assert found, f"no first admin token in the container's output:\n{logs[-3000:]}"
    return found.group(1)


def wait_health(url: str, timeout_s: float = 60) -> None:
    """Poll ``GET /health`` until it answers 200 (the server is up)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/health", timeout=2)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise AssertionError(f"{url}/health did not answer 200 within {timeout_s} s: {last}")


@dataclass
class Container:
    env: dict[str, str]
    name: str
    url: str

    def logs(self) -> str:
        done = podman(self.env, "logs", self.name, timeout=30)
        return done.stdout + done.stderr

    def inspect(self, template: str) -> str:
        return podman(self.env, "inspect", "--format", template, self.name).stdout.strip()

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return podman(self.env, "exec", self.name, *argv, check=False)


@contextmanager
def running(
    env: dict[str, str], name: str, port: int, *options: str, image: str = IMAGE
) -> Iterator[Container]:
    """A container of ``image`` with its port 8080 published on 127.0.0.1:``port``; removed
    (with its anonymous /data volume) at the end. Podman's health-check timer needs systemd:
    it is turned off, the tests run the image's HEALTHCHECK with ``podman healthcheck run``."""
    podman(env, "rm", "--force", "--volumes", name, check=False)
    podman(
        env, "run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:8080",
        "--health-interval", "disable", *options, image,
    )  # fmt: skip
    try:
        yield Container(env, name, f"http://127.0.0.1:{port}")
    finally:
        podman(env, "rm", "--force", "--volumes", "--time", "5", name, check=False)
