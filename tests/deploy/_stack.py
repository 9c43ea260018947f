"""A blue-green stack on loopback for the deploy tests: the colours' "virtualenvs" (scripts that
start this checkout's ``nox-api`` with a version of their own, or a broken build), a real Caddy or
nginx running the shipped configuration, ``deploy/release.sh`` in process mode, and a bounded
load generator."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.conftest import free_port, write_policy

__all__ = [
    "ADMIN_TOKEN",
    "DEPLOY",
    "Load",
    "REPO",
    "Stack",
    "make_colour",
    "nginx_config",
    "running_stack",
]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ADMIN_TOKEN = "deploy-test-admin-token-0123456789abcdef"
# The load generator sends far more than the default admin rate limit.
_POLICY = "rate_limits:\n  roles:\n    admin: 1000000/minute\n"

_STARTER = """#!/bin/sh
# A stand-in for /opt/nox/COLOUR/bin/nox-api: this checkout's server, reporting version {version}.
{extra}exec {python} -c 'import sys
import nox_api._version as v
v.__version__ = "{version}"
from nox_api.cli import main
sys.argv[0] = "nox-api"
main()' "$@"
"""


def make_colour(home: Path, colour: str, version: str, *, broken: str | None = None) -> None:
    """``home/colour/bin/nox-api``: the server at ``version``; ``broken="exit"`` makes a build
    that cannot start, ``broken="unhealthy"`` one whose detailed health answers 503."""
    exe = home / colour / "bin" / "nox-api"
    exe.parent.mkdir(parents=True, exist_ok=True)
    if broken == "exit":
        text = "#!/bin/sh\necho 'ImportError: this build is broken' >&2\nexit 1\n"
    else:
        # more free disk than any machine has: the disk check, and so the health, is fail
        extra = "export NOX_DISK_FREE_MIN_MIB=1000000000\n" if broken == "unhealthy" else ""
        text = _STARTER.format(version=version, extra=extra, python=sys.executable)
    exe.write_text(text)
    exe.chmod(0o755)


def _tls_files(folder: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1; returns the CA's file."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, ca: bool
    ) -> x509.CertificateBuilder:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("nox test CA", ca_key, None, True).sign(ca_key, hashes.SHA256())
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        cert("127.0.0.1", key, ca.subject, False)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "fullchain.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (folder / "privkey.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "ca.pem"


@dataclass
class Stack:
    """What a test drives: the proxy's URL and the environment of ``release.sh``."""

    kind: str
    url: str
    env: dict[str, str]
    upstream_file: Path
    state: Path
    verify: ssl.SSLContext | bool = True

    def release(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(DEPLOY / "release.sh"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", verify=self.verify, timeout=10)


def _wait_http(url: str, verify: ssl.SSLContext | bool, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the proxy exited during start-up"
        try:
            httpx.get(url, verify=verify, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"the proxy did not answer at {url} within 20 s")


def _caddy(work: Path, upstream: Path, env: dict[str, str]) -> tuple[list[str], str, bool]:
    port, admin = free_port(), free_port()
    env.update(
        NOX_SITE=f"http://127.0.0.1:{port}",
        NOX_CADDY_ADMIN=f"127.0.0.1:{admin}",
        NOX_UPSTREAM_FILE=str(upstream),
        XDG_DATA_HOME=str(work / "caddy-data"),
        XDG_CONFIG_HOME=str(work / "caddy-config"),
    )
    config = ["--config", str(DEPLOY / "caddy" / "Caddyfile"), "--adapter", "caddyfile"]
    env.update(
        NOX_RELEASE_PROXY="caddy",
        NOX_RELEASE_CHECK=" ".join(["caddy", "validate", *config]),
        NOX_RELEASE_RELOAD=" ".join(
            ["caddy", "reload", *config, "--address", env["NOX_CADDY_ADMIN"]]
        ),
    )
    return ["caddy", "run", *config], f"http://127.0.0.1:{port}", True


def nginx_config(work: Path, upstream: Path, http_port: int, tls_port: int) -> Path:
    """The shipped nox.conf on loopback ports, inside a main configuration of its own."""
    tls = work / "tls"
    tls.mkdir(exist_ok=True)
    _tls_files(tls)
    text = (DEPLOY / "nginx" / "nox.conf").read_text()
    for old, new in {
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen [::]:80;": "",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{tls_port} ssl http2;",
        "listen [::]:443 ssl http2;": "",
        "/etc/nox/upstream.nginx": str(upstream),
        "/etc/nox/tls/": f"{tls}/",
    }.items():
        assert old in text, f"nox.conf no longer has {old!r}"
        text = text.replace(old, new)
    (work / "nox.conf").write_text(text)
    temp = work / "nginx-temp"
    temp.mkdir(exist_ok=True)
    main = work / "nginx.conf"
    main.write_text(
        f"pid {work}/nginx.pid;\nerror_log {work}/nginx-error.log;\nworker_processes 2;\n"
        "events { worker_connections 512; }\n"
        "http {\n  access_log off;\n"
        + "".join(
            f"  {kind}_temp_path {temp}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"  include {work}/nox.conf;\n}}\n"
    )
    return main


def _nginx(
    work: Path, upstream: Path, env: dict[str, str]
) -> tuple[list[str], str, ssl.SSLContext]:
    tls_port = free_port()
    main = nginx_config(work, upstream, free_port(), tls_port)
    base = f"nginx -e {work}/nginx-error.log -c {main}"
    env.update(
        NOX_RELEASE_PROXY="nginx",
        NOX_RELEASE_CHECK=f"{base} -t -q",
        NOX_RELEASE_RELOAD=f"{base} -s reload",
        NOX_RELEASE_CURL_OPTS=f"--cacert {work}/tls/ca.pem",
    )
    command = ["nginx", "-e", f"{work}/nginx-error.log", "-c", str(main), "-g", "daemon off;"]
    context = ssl.create_default_context(cafile=str(work / "tls" / "ca.pem"))
    return command, f"https://127.0.0.1:{tls_port}", context


@contextmanager
def running_stack(kind: str, work: Path, data_dir: Path) -> Iterator[Stack]:
    """Blue (version 1.0.0-blue) live behind a real ``kind`` proxy; green built (2.0.0-green)
    but not started. Everything is stopped at the end."""
    home, state = work / "opt-nox", work / "state"
    make_colour(home, "blue", "1.0.0-blue")
    make_colour(home, "green", "2.0.0-green")
    blue, green = free_port(), free_port()
    upstream = work / f"upstream.{kind}"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(work),
        "NOX_RELEASE_CONFIG": str(work / "no-such-file"),
        "NOX_RELEASE_MANAGER": "process",
        "NOX_RELEASE_HOME": str(home),
        "NOX_RELEASE_STATE_DIR": str(state),
        "NOX_BLUE_PORT": str(blue),
        "NOX_GREEN_PORT": str(green),
        "NOX_RELEASE_TOKEN": ADMIN_TOKEN,
        "NOX_RELEASE_INTERVAL_S": "0.2",
        "NOX_RELEASE_START_TIMEOUT_S": "30",
        "NOX_RELEASE_VERIFY_TIMEOUT_S": "15",
        "NOX_RELEASE_DRAIN_S": "3",
        "NOX_RELEASE_STOP_TIMEOUT_S": "15",
        # the colours' own settings (systemd reads them from /etc/default/nox-api*)
        "NOX_DATA_DIR": str(data_dir),
        "NOX_API_TOKEN": ADMIN_TOKEN,
        "NOX_POOL_SIZE": "1",
        "NOX_POOL_STEMS": "0",
        "NOX_TRUSTED_PROXIES": "127.0.0.1",
        "NOX_POLICY_FILE": str(write_policy(work, _POLICY)),
        "NOX_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
    }
    verify: ssl.SSLContext | bool
    if kind == "caddy":
        command, url, verify = _caddy(work, upstream, env)
    else:
        command, url, verify = _nginx(work, upstream, env)
    env["NOX_RELEASE_PROXY_URL"] = url
    env["NOX_RELEASE_UPSTREAM_FILE"] = str(upstream)
    upstream.write_text(
        f"to 127.0.0.1:{blue}\n" if kind == "caddy" else f"server 127.0.0.1:{blue};\n"
    )
    stack = Stack(kind, url, env, upstream, state, verify)
    proxy: subprocess.Popen[bytes] | None = None
    try:
        started = stack.release("start", "blue")
        assert started.returncode == 0, started.stdout + started.stderr
        with (work / f"{kind}.log").open("wb") as log:
            proxy = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_http(f"{url}/health", verify, proxy)
        yield stack
    finally:
        for colour in ("blue", "green"):
            stack.release("stop", colour, timeout=60)
        if proxy is not None:
            proxy.send_signal(signal.SIGTERM if kind == "caddy" else signal.SIGQUIT)
            try:
                proxy.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Load:
    """Requests through the proxy on kept-alive connections, from ``threads`` threads, until
    stopped (at most ``max_s`` seconds and ``max_requests`` requests)."""

    url: str
    verify: ssl.SSLContext | bool
    threads: int = 2
    max_s: float = 90.0
    max_requests: int = 50_000
    failures: list[str] = field(default_factory=list)
    # Requests sent again once because the proxy closed a kept-alive connection just as they
    # went out (a reload closes its idle connections): what HTTP/1.1 clients do with idempotent
    # requests (RFC 9112, 9.3.1; Go's client, the Nox SDK and noxctl do it). Only these errors,
    # only once: a second failure, or any other error, is a failure.
    resent: list[str] = field(default_factory=list)
    answered_by: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _work(self) -> None:
        deadline = time.monotonic() + self.max_s
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(verify=self.verify, timeout=10) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self._lock:
                    if self.total >= self.max_requests:
                        return
                try:
                    health = self._get(client, f"{self.url}/health", {})
                    me = self._get(client, f"{self.url}/api/me", headers)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    for resp in (health, me):
                        if resp.status_code != 200:
                            self.failures.append(f"HTTP {resp.status_code}: {resp.text[:200]}")
                        self.answered_by[resp.headers.get("x-nox-upstream", "?")] += 1
                    if health.status_code == 200:
                        self.versions[health.json()["version"]] += 1

    def _get(self, client: httpx.Client, url: str, headers: dict[str, str]) -> httpx.Response:
        try:
            return client.get(url, headers=headers)
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            with self._lock:
                self.resent.append(f"{type(exc).__name__}: {exc}")
            return client.get(url, headers=headers)

    @property
    def total(self) -> int:
        return sum(self.answered_by.values()) + len(self.failures)

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            worker = threading.Thread(target=self._work, daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=30)
