"""One real Nox server for the whole folder: ``nox-api serve`` on 127.0.0.1 with the real
bubblewrap sandbox, real tokens of each role in its database, and a policy whose code limit is
small enough to hit and whose rate limits are out of the way.

``noxctl`` runs in-process through typer's ``CliRunner`` (the same ``main`` as the console
script) or as the installed console script in a process of its own."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import SANDBOX_ROOT, _token, free_port, nox_serve, write_policy
from typer.testing import CliRunner, Result

from nox_api.config import load_settings
from nox_api.services.tokens import Role
from noxsdk.cli import app

CODE_BYTES_MAX = 65536
POLICY = f"""
limits:
  maxima:
    code_bytes: {CODE_BYTES_MAX}
rate_limits:
  roles:
    viewer: 100000/minute
    runner: 100000/minute
    admin: 100000/minute
  auth_failures_per_client: 1000/minute
"""
NOXCTL = Path(sys.executable).parent / "noxctl"  # the console script of sdk/pyproject.toml


@dataclass(frozen=True)
class Live:
    """The running server and a token of each role (all of the workspace ``default``)."""

    url: str
    admin: str
    runner: str
    viewer: str
    data_dir: Path

    def env(self, token: str | None = None, **extra: str | None) -> dict[str, str | None]:
        """``NOX_URL`` and ``NOX_API_TOKEN`` (the admin's unless ``token``) over ``extra``."""
        return {
            "NOX_URL": self.url,
            "NOX_API_TOKEN": self.admin if token is None else token,
            "COLUMNS": None,
            **extra,
        }


@pytest.fixture(scope="package")
def live() -> Iterator[Live]:
    folder = Path(tempfile.mkdtemp(prefix="nox-cli-", dir=os.path.realpath(SANDBOX_ROOT)))
    folder.chmod(0o711)
    data = folder / "data"
    data.mkdir(mode=0o711)
    settings = load_settings(data_dir=data)
    tokens = {role: _token(settings, role) for role in (Role.ADMIN, Role.RUNNER, Role.VIEWER)}
    port = free_port()
    env = {
        "NOX_POLICY_FILE": str(write_policy(folder, POLICY)),
        "NOX_BACKUP_KEY": secrets.token_hex(32),
        "NOX_DISK_FREE_MIN_MIB": "0",
    }
    try:
        with nox_serve(data, port, **env):
            yield Live(
                f"http://127.0.0.1:{port}",
                tokens[Role.ADMIN],
                tokens[Role.RUNNER],
                tokens[Role.VIEWER],
                data,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def noxctl(
    live: Live, *args: str, token: str | None = None, stdin: str | bytes | None = None
) -> Result:
    """``noxctl ARGS`` in-process against ``live``: exit code, stdout and stderr apart."""
    result = CliRunner().invoke(app, list(args), input=stdin, env=live.env(token))
    # noxctl itself never lets an exception out: every failure is an exit code
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result


def run_noxctl(
    args: Sequence[str],
    env: Mapping[str, str | None],
    *,
    stdin: str | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """The installed ``noxctl`` console script in a process of its own."""
    assert NOXCTL.is_file(), f"{NOXCTL} is missing: pip install -e './sdk[cli]'"
    return subprocess.run(
        [str(NOXCTL), *args],
        env=process_env(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )


def process_env(env: Mapping[str, str | None]) -> dict[str, str]:
    """A child's environment: ``PATH`` (with noxctl's folder) and ``HOME`` of this process,
    then ``env``."""
    base = {
        "PATH": f"{NOXCTL.parent}{os.pathsep}{os.environ['PATH']}",  # noxctl, as once installed
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    return {**base, **{k: v for k, v in env.items() if v is not None}}


def default_sigint() -> None:
    """For ``preexec_fn``: a child that ignored Ctrl-C (a background job's) takes it again."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
