"""The installed ``noxctl`` console script in processes of its own: what a shell sees.

Exit codes and the two output streams of runs, the one-line errors (never a traceback) for a
wrong URL, a wrong token and a dead server, Ctrl-C, progress bars on a terminal, following the
server log, and shell completion.
"""

from __future__ import annotations

import http.server
import json
import os
import pty
import select
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from tests.conftest import free_port

from .conftest import NOXCTL, Live, default_sigint, process_env, run_noxctl

pytestmark = pytest.mark.sandbox


def test_a_run_passes_its_streams_and_exit_code_through(live: Live) -> None:
    code = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(7)"
    done = run_noxctl(["run-py", "-c", code], live.env(live.runner))
    assert (done.returncode, done.stdout, done.stderr) == (7, "to stdout\n", "to stderr\n")
    shell = run_noxctl(["run-sh", "-", "--timeout", "5"], live.env(), stdin="echo hi; exit 42")
    assert (shell.returncode, shell.stdout, shell.stderr) == (42, "hi\n", "")


def test_a_timeout_exits_124_and_the_memory_limit_137(live: Live) -> None:
    slow = run_noxctl(["run-py", "--timeout", "0.5", "-c", "while True: pass"], live.env())
    assert (slow.returncode, slow.stdout, slow.stderr) == (124, "", "")
    hog = "x = bytearray(512 * 1024 * 1024)"
    greedy = run_noxctl(["run-py", "--memory", "32", "-c", hog, "--json"], live.env())
    assert greedy.returncode == 137
    assert json.loads(greedy.stdout)["status"] == "memory_limit"


@pytest.fixture(scope="module")
def not_nox() -> Iterator[str]:
    """Another web server (a plain page at every path) where a Nox server was expected."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html><body>Welcome to nginx!</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _cases(live: Live, not_nox: str) -> dict[str, tuple[dict[str, str | None], int, str]]:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    return {
        "malformed URL": (live.env(NOX_URL="127.0.0.1:8080"), 1, "invalid server URL"),
        "URL with a wrong path": (live.env(NOX_URL=live.url + "/nox"), 1, "HTTP 404 not_found"),
        "URL of another web server": (live.env(NOX_URL=not_nox), 1, "HTTP 200 unexpected_"),
        "wrong token": (live.env("nox_wrong_token"), 3, "HTTP 401 unauthorized"),
        "dead server": (live.env(NOX_URL=dead), 1, f"could not connect to {dead}"),
    }


@pytest.mark.parametrize(
    "case",
    ["malformed URL", "URL with a wrong path", "URL of another web server", "wrong token",
     "dead server"],
)  # fmt: skip
def test_connection_problems_are_one_line(live: Live, not_nox: str, case: str) -> None:
    env, code, start = _cases(live, not_nox)[case]
    done = run_noxctl(["whoami"], env)
    assert done.returncode == code, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"noxctl: error: {start}"), done.stderr
    assert "(hint: check NOX_" in done.stderr
    assert "Traceback" not in done.stderr

    as_json = run_noxctl(["--retries", "0", "whoami", "--json"], env)
    assert as_json.returncode == code
    assert as_json.stdout == ""
    assert as_json.stderr.count("\n") == 1
    error = json.loads(as_json.stderr)["error"]
    assert error["exit_code"] == code
    assert error["message"]
    assert error["hint"].startswith("check NOX_")


def test_ctrl_c_exits_130_without_a_traceback(live: Live) -> None:
    proc = subprocess.Popen(
        [str(NOXCTL), "run-py", "-c", "import time; time.sleep(30)"],
        env=process_env(live.env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,  # noqa: PLW1509 - only resets a signal
    )
    time.sleep(1.5)  # the request is out, the run is going on
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert out == ""
    assert "Traceback" not in err


def _on_a_terminal(args: list[str], live: Live, cwd: Path) -> tuple[int, str, str]:
    """``noxctl ARGS`` with stderr on a pseudo-terminal: exit code, stdout, what the terminal
    showed."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [str(NOXCTL), *args],
        env=process_env(live.env(TERM="xterm-256color", COLUMNS="100")),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = bytearray()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(controller)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(10), out, shown.decode(errors="replace")


def test_progress_bars_show_on_a_terminal_only(live: Live, tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    code, out, shown = _on_a_terminal(["put", "big.bin", "bars/big.bin"], live, tmp_path)
    assert code == 0
    assert out.startswith("bars/big.bin  3.0 MiB  sha256 ")
    assert "put bars/big.bin" in shown
    assert "3.0/3.0 MiB" in shown  # the bar's last state: every byte sent

    code, out, shown = _on_a_terminal(["cat", "bars/big.bin", "-o", "copy.bin"], live, tmp_path)
    assert (code, out) == (0, "")
    assert "get bars/big.bin" in shown
    assert "3.0/3.0 MiB" in shown
    assert (tmp_path / "copy.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()

    code, out, shown = _on_a_terminal(["backup", "bars-backup"], live, tmp_path)
    assert code == 0
    assert "backing up as bars-backup" in shown

    code, out, shown = _on_a_terminal(
        ["put", "big.bin", "bars/again.bin", "--json"], live, tmp_path
    )
    assert (code, shown) == (0, "")  # --json: nothing but the document
    assert json.loads(out)["path"] == "bars/again.bin"
    piped = run_noxctl(["put", "big.bin", "bars/piped.bin"], live.env(), cwd=tmp_path)
    assert (piped.returncode, piped.stderr) == (0, "")  # stderr not a terminal: no bar


def test_logs_follow_prints_new_lines_as_they_come(live: Live) -> None:
    proc = subprocess.Popen(
        [str(NOXCTL), "logs", "-n", "1", "--follow", "--duration", "4", "--json"],
        env=process_env(live.env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    request_id = uuid.uuid4().hex
    time.sleep(1.5)  # the stream is open
    headers = {"Authorization": f"Bearer {live.viewer}", "X-Request-ID": request_id}
    assert httpx2.get(f"{live.url}/api/me", headers=headers, timeout=10).status_code == 200
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (0, "")
    records = [json.loads(line) for line in out.splitlines()]  # JSON Lines
    assert len(records) >= 2  # the tail, then what came
    assert any(r.get("request_id") == request_id for r in records[1:]), out


def test_shell_completion_installs_and_completes(tmp_path: Path) -> None:
    env = process_env({"HOME": str(tmp_path)})
    installed = subprocess.run(  # bash is the parent: the shell is detected
        ["bash", "-c", f"{NOXCTL} --install-completion"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    script = tmp_path / ".bash_completions" / "noxctl.sh"
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()
    completed = subprocess.run(
        ["bash", "-c", f"source {script}; COMP_WORDS=(noxctl run); COMP_CWORD=1; "
         "_noxctl_completion noxctl; printf '%s\\n' \"${COMPREPLY[@]}\""],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert completed.stdout.split() == ["run-py", "run-sh"], completed.stderr

    for shell, path in (
        ("zsh", ".zfunc/_noxctl"),
        ("fish", ".config/fish/completions/noxctl.fish"),
    ):
        done = run_noxctl(
            ["--install-completion", shell],
            {"HOME": str(tmp_path), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
        )
        assert done.returncode == 0, done.stderr
        assert "_NOXCTL_COMPLETE=complete_" in (tmp_path / path).read_text()
