"""``noxctl`` is the console script of the SDK's ``cli`` extra, and the SDK without it never
imports typer or rich."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import noxsdk

from .conftest import run_noxctl

SDK = Path(__file__).resolve().parents[2] / "sdk"


def test_the_console_script_and_its_extra_are_declared() -> None:
    project = tomllib.loads((SDK / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["noxctl"] == "noxsdk.cli:main"
    extra = " ".join(project["optional-dependencies"]["cli"])
    assert "typer" in extra
    assert "rich" in extra
    assert not any(d.startswith(("typer", "rich")) for d in project["dependencies"])


def test_the_installed_console_script_runs() -> None:
    done = run_noxctl(["--version"], {})
    assert (done.returncode, done.stdout, done.stderr) == (0, f"noxctl {noxsdk.__version__}\n", "")
    module = subprocess.run(
        [sys.executable, "-m", "noxsdk.cli", "--version"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert module.stdout == done.stdout


def test_the_sdk_does_not_import_the_cli_libraries() -> None:
    code = (
        "import sys, noxsdk, noxsdk.client, noxsdk.aio, noxsdk.errors, noxsdk.models\n"
        "with noxsdk.NoxClient('http://127.0.0.1:1') as client:\n"
        "    pass\n"
        "loaded = {'typer', 'rich', 'click', 'noxsdk.cli'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
