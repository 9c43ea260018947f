"""How a Python run ends: the sandbox reports the end itself (exit code and CPU time on a status
pipe) after doing what the interpreter does at exit, and the server answers without waiting for
the sandbox to be torn down. These tests pin what a program may rely on at its end."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from tests.sandbox._helpers import run_py, run_sh

pytestmark = pytest.mark.sandbox


def test_file_left_open_is_flushed_for_the_next_run(bwrap_client: TestClient) -> None:
    run_py(bwrap_client, "f = open('left-open.txt', 'w')\nf.write('kept' * 1000)")
    got = run_py(bwrap_client, "print(len(open('left-open.txt').read()))")
    assert got["stdout"] == "4000\n"


def test_non_daemon_thread_finishes_and_prints(bwrap_client: TestClient) -> None:
    code = (
        "import threading, time\n"
        "def late():\n    time.sleep(0.3)\n    print('late', flush=True)\n"
        "threading.Thread(target=late).start()\nprint('main')"
    )
    got = run_py(bwrap_client, code)
    assert got["status"] == "ok"
    assert got["stdout"] == "main\nlate\n"


def test_atexit_functions_run(bwrap_client: TestClient) -> None:
    got = run_py(bwrap_client, "import atexit\natexit.register(print, 'bye')\nprint('hi')")
    assert got["stdout"] == "hi\nbye\n"


def test_destructor_output_at_the_end_is_kept(bwrap_client: TestClient) -> None:
    code = "class A:\n    def __del__(self):\n        print('gone')\na = A()\nprint('made')"
    assert run_py(bwrap_client, code)["stdout"] == "made\ngone\n"


@pytest.mark.parametrize(
    ("code", "exit_code", "stderr"),
    [
        ("import sys; sys.exit(3)", 3, ""),
        ("import sys; sys.exit('no good')", 1, "no good\n"),
        ("import sys; sys.exit(None)", 0, ""),
        ("exit(4)", 4, ""),
    ],
)
def test_exit_codes_as_the_interpreter_gives_them(
    bwrap_client: TestClient, code: str, exit_code: int, stderr: str
) -> None:
    got = run_py(bwrap_client, code)
    assert got["exit_code"] == exit_code
    assert got["stderr"] == stderr


def test_sys_exit_in_an_atexit_function_is_ignored_as_by_the_interpreter(
    bwrap_client: TestClient,
) -> None:
    got = run_py(bwrap_client, "import atexit, sys\natexit.register(sys.exit, 5)")
    assert got["exit_code"] == 0
    assert "Exception ignored in atexit callback" in got["stderr"]


def test_unbuffered_output_in_bulk_is_complete(bwrap_client: TestClient) -> None:
    got = run_py(
        bwrap_client, "import sys\nfor i in range(20000):\n    sys.stdout.write(f'{i}\\n')"
    )
    assert got["stdout"].splitlines()[-1] == "19999"
    assert len(got["stdout"].splitlines()) == 20000


def test_background_process_is_stopped_when_the_program_ends(bwrap_client: TestClient) -> None:
    started = time.monotonic()
    got = run_py(
        bwrap_client,
        "import subprocess\nsubprocess.Popen(['sleep', '30'])\nprint('left it')",
        timeout_s=20,
    )
    assert got["status"] == "ok"
    assert time.monotonic() - started < 10
    # Nothing of it is left for the next run of the workspace to see.
    ps = run_sh(bwrap_client, "ls /proc | grep -c '^[0-9]'")
    assert ps["stdout"].strip() in {"2", "3", "4"}  # bwrap's init, sh, ls (and grep)


def test_a_program_scribbling_on_the_status_pipe_ends_the_ordinary_way(
    bwrap_client: TestClient,
) -> None:
    # The status pipe is inside the sandbox: a program may write to it. A malformed report is
    # ignored and the run ends when the process exits; the answer stays right.
    code = (
        "import os\n"
        "for fd in range(3, 20):\n"
        "    try:\n        os.write(fd, b'bogus report\\n')\n    except OSError:\n        pass\n"
        "print('done')\nraise SystemExit(7)"
    )
    got = run_py(bwrap_client, code)
    assert got["stdout"] == "done\n"
    assert got["exit_code"] == 7
    assert got["status"] == "error"


def test_warm_sandbox_runs_at_normal_priority_and_no_better(bwrap_client: TestClient) -> None:
    # The pool starts sandboxes nice; the bootstrap takes nice 0 back and cannot go further.
    code = (
        "import os, resource\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0))\n"
        "try:\n    os.setpriority(os.PRIO_PROCESS, 0, -1)\nexcept OSError as e:\n"
        "    print(type(e).__name__)\n"
        "try:\n    resource.setrlimit(resource.RLIMIT_NICE, (21, 21))\n"
        "except (OSError, ValueError) as e:\n"
        "    print(type(e).__name__)\n"
    )
    run_py(bwrap_client, "pass")  # a warm sandbox is ready after this one
    time.sleep(0.5)
    got = run_py(bwrap_client, code)
    assert got["stdout"].split() == ["0", "PermissionError", "ValueError"]
