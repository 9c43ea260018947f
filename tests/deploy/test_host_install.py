"""The host installation: ``deploy/install.sh`` into a root prefix (and ``--dry-run``), the systemd
template unit checked by ``systemd-analyze``, the proxy configurations checked by Caddy and nginx
themselves, and every shell script by shellcheck."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tests.deploy._stack import DEPLOY, REPO, nginx_config

from nox_api.services.tokens import Role, TokenService
from nox_api.storage.db import Database

pytestmark = pytest.mark.deploy

SCRIPTS = [
    DEPLOY / "install.sh",
    DEPLOY / "release.sh",
    REPO / "scripts" / "audit.sh",
    REPO / "scripts" / "setup.sh",
    REPO / ".ci" / "run",
]


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert path, f"{name} must be installed (NOX_SETUP_FOR=test scripts/setup.sh installs it)"
    return path


def _install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEPLOY / "install.sh"), "--root", str(root), *args],
        env={"PATH": os.environ["PATH"], "HOME": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _fake_venv(root: Path) -> None:
    """/opt/nox/blue as install.sh would build it, but running this checkout (a real virtualenv
    costs half a minute of pip)."""
    exe = root / "opt/nox/blue/bin/nox-api"
    exe.parent.mkdir(parents=True)
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} -m nox_api "$@"\n')
    exe.chmod(0o755)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _verify_units(root: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify of both colours' instances as installed below ``root``, with the
    system's targets and slices copied in (the unit names them) and without systemd running."""
    lib = root / "usr/lib/systemd/system"
    lib.mkdir(parents=True, exist_ok=True)
    for unit in Path("/usr/lib/systemd/system").glob("*"):
        if unit.suffix in (".target", ".slice") and unit.is_file() and not unit.is_symlink():
            shutil.copy(unit, lib)
    return subprocess.run(
        [_tool("systemd-analyze"), "verify", "--man=no", f"--root={root}",
         "nox-api@blue.service", "nox-api@green.service"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_install_into_a_root_prefix(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _fake_venv(root)
    done = _install(root, "--no-venv")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped: system packages and the nox user" in done.stdout

    unit = root / "etc/systemd/system/nox-api@.service"
    assert unit.read_text() == (DEPLOY / "systemd/nox-api@.service").read_text()
    assert _mode(unit) == 0o644
    settings = (root / "etc/default/nox-api").read_text()
    assert "NOX_DATA_DIR=/var/lib/nox" in settings
    assert "NOX_HOST=127.0.0.1" in settings
    assert "NOX_TRUSTED_PROXIES=127.0.0.1,::1" in settings
    assert _mode(root / "etc/default/nox-api") == 0o640
    assert "NOX_PORT=8081" in (root / "etc/default/nox-api-blue").read_text()
    assert "NOX_PORT=8082" in (root / "etc/default/nox-api-green").read_text()
    release_settings = (root / "etc/default/nox-release").read_text()
    assert "NOX_BLUE_PORT=8081\nNOX_GREEN_PORT=8082\n" in release_settings
    assert "NOX_RELEASE_PROXY_URL=" in release_settings
    assert (root / "etc/nox/upstream.caddy").read_text() == "to 127.0.0.1:8081\n"
    assert (root / "etc/nox/upstream.nginx").read_text() == "server 127.0.0.1:8081;\n"
    assert _mode(root / "var/lib/nox") == 0o750
    assert _mode(root / "etc/nox") == 0o755  # Caddy's own user reads the upstream file
    for name in ("release.sh", "install.sh"):
        assert os.access(root / "opt/nox/deploy" / name, os.X_OK)
    assert (root / "opt/nox/deploy/caddy/Caddyfile").is_file()

    # the first admin token is printed once; release.sh's viewer token is in a 0600 file
    token_file = root / "etc/nox/release.token"
    assert _mode(token_file) == 0o600
    db = Database(f"sqlite:///{root / 'var/lib/nox/nox.db'}")
    try:
        tokens = TokenService(db)
        release = tokens.authenticate(token_file.read_text().strip())
        assert release is not None
        assert release.role is Role.VIEWER
        admin_line = done.stdout.split("shown this once; keep it safe):\n", 1)[1].splitlines()
        admin = tokens.authenticate(next(line for line in admin_line if not line.startswith("+")))
        assert admin is not None
        assert admin.role is Role.ADMIN
    finally:
        db.close()

    # the unit as installed passes systemd-analyze verify (its ExecStart exists there)
    (root / "opt/nox/green/bin").mkdir(parents=True)
    shutil.copy(root / "opt/nox/blue/bin/nox-api", root / "opt/nox/green/bin/nox-api")
    verified = _verify_units(root)
    # systemd-analyze exits 0 on a line it ignores: a clean unit leaves stderr empty too
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stderr.strip() == ""

    # run again: an administrator's edits are kept, no second token
    (root / "etc/default/nox-api").write_text("NOX_PORT=1\n# edited\n")
    again = _install(root, "--no-venv")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (root / "etc/default/nox-api").read_text() == "NOX_PORT=1\n# edited\n"
    assert "kept " in again.stdout
    assert "shown this once" not in again.stdout


def test_a_broken_unit_fails_systemd_analyze(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _fake_venv(root)
    (root / "opt/nox/green/bin").mkdir(parents=True)
    shutil.copy(root / "opt/nox/blue/bin/nox-api", root / "opt/nox/green/bin/nox-api")
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    text = (DEPLOY / "systemd/nox-api@.service").read_text()
    (units / "nox-api@.service").write_text(
        text.replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe")
    )
    line = text.splitlines().index("NoNewPrivileges=yes") + 1
    verified = _verify_units(root)
    assert f"nox-api@.service:{line}: Failed to parse boolean value, ignoring: maybe" in (
        verified.stderr
    )
    (root / "opt/nox/green/bin/nox-api").unlink()
    verified = _verify_units(root)
    assert verified.returncode != 0
    assert "Command /opt/nox/green/bin/nox-api is not executable" in verified.stderr


def test_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    done = _install(root, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(root.iterdir()) == []
    for action in (
        f"-m venv --clear {root}/opt/nox/blue",
        f"+ write {root}/etc/systemd/system/nox-api@.service",
        f"+ write {root}/etc/default/nox-api ",
        f"+ write {root}/etc/nox/release.token",
        "token create --role admin --name admin",
    ):
        assert action in done.stdout, action


def test_the_unit_keeps_bubblewrap_working() -> None:
    """The options that would break bubblewrap's sandboxes are not set (see the unit's header);
    the ones that matter most are."""
    options = dict(
        line.split("=", 1)
        for line in (DEPLOY / "systemd/nox-api@.service").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    for breaking in ("ProtectKernelTunables", "ProtectKernelLogs", "RestrictNamespaces",
                     "ProtectControlGroups", "PrivateUsers", "PrivateNetwork", "ProcSubset",
                     "MemoryDenyWriteExecute"):  # fmt: skip
        assert breaking not in options, breaking
    assert options["Delegate"] == "yes"
    assert options["NoNewPrivileges"] == "yes"
    assert options["ProtectSystem"] == "strict"
    assert options["User"] == "nox"
    assert "AF_NETLINK" in options["RestrictAddressFamilies"]  # bwrap brings up lo with it
    assert options["ExecStart"] == "/opt/nox/%i/bin/nox-api serve"
    assert options["EnvironmentFile"] == "/etc/default/nox-api-%i"  # the last one wins here


def test_the_proxy_configurations_load(tmp_path: Path) -> None:
    upstream = tmp_path / "upstream.caddy"
    upstream.write_text("to 127.0.0.1:8081\n")
    caddy = subprocess.run(
        [_tool("caddy"), "validate", "--config", str(DEPLOY / "caddy/Caddyfile"),
         "--adapter", "caddyfile"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
             "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path),
             "NOX_UPSTREAM_FILE": str(upstream)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert caddy.returncode == 0, caddy.stderr
    assert "Valid configuration" in caddy.stdout + caddy.stderr

    upstream = tmp_path / "upstream.nginx"
    upstream.write_text("server 127.0.0.1:8081;\n")
    main = nginx_config(tmp_path, upstream, 8080, 8443)
    nginx = subprocess.run(
        [_tool("nginx"), "-e", str(tmp_path / "error.log"), "-c", str(main), "-t"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert nginx.returncode == 0, nginx.stderr
    assert "test is successful" in nginx.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script: Path) -> None:
    done = subprocess.run(
        [_tool("shellcheck"), str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout
