"""Each script of examples/ runs against the live server and does what its README row says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Live, process_env

pytestmark = pytest.mark.sandbox

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str, live: Live, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=process_env(live.env(token)),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done


def test_every_example_is_tested_and_listed() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == {
        "run_and_handle_errors.py", "upload_and_process.py", "async_fan_out.py",
        "create_ci_token.py",
    }  # fmt: skip
    readme = (EXAMPLES / "README.md").read_text()
    assert all(f"[`{name}`]({name})" in readme for name in scripts)


def test_run_and_handle_errors(live: Live) -> None:
    out = _example("run_and_handle_errors.py", live, live.runner).stdout.splitlines()
    assert out[0] == "works: ok, printed '45'"
    assert out[1] == "raises: error, exit code 1: ValueError: bad input"
    assert re.fullmatch(r"loops forever: stopped after [\d.]+ s \(timeout\)", out[2])
    assert out[3].startswith("refused: ")


def test_run_and_handle_errors_with_a_wrong_token(live: Live) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "run_and_handle_errors.py")],
        env=process_env(live.env("nox_not_a_token")),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (3, "the token is wrong: set NOX_API_TOKEN\n")


def test_upload_and_process(live: Live) -> None:
    out = _example("upload_and_process.py", live, live.runner).stdout.splitlines()
    assert re.fullmatch(r"uploaded example/sales\.csv: \d+ bytes, sha256 [0-9a-f]{64}", out[0])
    assert out[1] == "1000 rows, 4 regions"
    assert re.fullmatch(r'totals: \{"E": \d+, "N": \d+, "S": \d+, "W": \d+\}', out[2])


def test_async_fan_out(live: Live) -> None:
    out = _example("async_fan_out.py", live, live.runner, "30").stdout
    expected = sum(n * n for n in range(30))
    assert re.fullmatch(rf"30 runs in [\d.]+ s, 0 failed, sum of squares {expected}\n", out)


def test_create_ci_token(live: Live) -> None:
    done = _example("create_ci_token.py", live, live.admin, "--name", "ci-example", "--days", "7")
    secret = done.stdout.strip()
    assert re.fullmatch(
        r"token [0-9a-f]+ for 'ci-example': role runner, workspace ci, expires \S+; "
        r"test run said 'ready'\n",
        done.stderr,
    )
    me = subprocess.run(
        [sys.executable, "-c", "import noxsdk; print(noxsdk.NoxClient().me().workspace)"],
        env=process_env(live.env(secret)), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert me.stdout == "ci\n", me.stderr
    refused = subprocess.run(
        [sys.executable, str(EXAMPLES / "create_ci_token.py"), "--name", "nope"],
        env=process_env(live.env(live.runner)), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert refused.returncode == 3
