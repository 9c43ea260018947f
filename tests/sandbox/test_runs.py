"""Real bubblewrap runs through HTTP: output, exit codes, stdin, environment, the workspace
(uploads, persistence, ownership, path checks), authentication and the warm pool."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from nox_api.config import Settings
from nox_api.services.policy import Policy
from nox_api.services.tokens import Role

from ._helpers import SANDBOX_UID, own_server, run_py, run_sh

pytestmark = pytest.mark.sandbox


def put(client: TestClient, content: bytes, path: str | None, filename: str = "upload.bin"):  # type: ignore[no-untyped-def]
    data = {"path": path} if path is not None else None
    return client.post("/put", files={"file": (filename, content)}, data=data)


def workspace_of(settings: Settings, name: str = "default") -> Path:
    return settings.workspaces_dir / name


def host_owner(settings: Settings) -> int:
    """Host uid of files made in a sandbox: the sandbox user when the server runs as root
    (bwrap goes through setpriv), else the server's own uid (the user namespace maps to it)."""
    return settings.sandbox_uid if os.geteuid() == 0 else os.getuid()


def wait_pool_ready(client: TestClient, timeout_s: float = 10.0) -> None:
    sandbox = client.app.state.nox.sandbox  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    while sandbox.pool_stats().ready < 1:
        assert time.monotonic() < deadline, f"the warm pool never refilled: {sandbox.pool_stats()}"
        time.sleep(0.02)


def tree_snapshot(root: Path, skip: Path) -> set[str]:
    """Every path below ``root`` except those below ``skip``."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        found.update(str(here / name) for name in (*dirnames, *filenames))
    return found


def sha256_of(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- output and exit codes -------------------------------------------------------------------
def test_python_output_and_ok(bwrap_client: TestClient) -> None:
    answer = run_py(bwrap_client, "import sys\nprint('to out')\nprint('to err', file=sys.stderr)")
    assert answer["status"] == "ok"
    assert answer["exit_code"] == 0
    assert answer["stdout"] == "to out\n"
    assert answer["stderr"] == "to err\n"
    assert answer["stdout_truncated"] is False
    assert answer["stderr_truncated"] is False
    assert answer["kind"] == "python"
    assert 0 < answer["duration_ms"] < 10_000
    assert answer["cpu_ms"] is None or answer["cpu_ms"] >= 0
    assert answer["limits"]["timeout_s"] == 10


def test_python_exit_code(bwrap_client: TestClient) -> None:
    answer = run_py(bwrap_client, "import sys\nprint('before')\nsys.exit(3)")
    assert answer["status"] == "error"
    assert answer["exit_code"] == 3
    assert answer["stdout"] == "before\n"


def test_python_exception_shows_only_user_traceback(bwrap_client: TestClient) -> None:
    answer = run_py(bwrap_client, "def f():\n    raise ValueError('boom')\nf()")
    assert answer["status"] == "error"
    assert answer["exit_code"] == 1
    assert answer["stderr"].startswith("Traceback (most recent call last):")
    assert answer["stderr"].rstrip().endswith("ValueError: boom")
    assert 'File "<string>", line 3, in <module>' in answer["stderr"]
    assert "_bootstrap" not in answer["stderr"]
    assert "_run_python" not in answer["stderr"]


def test_python_syntax_error(bwrap_client: TestClient) -> None:
    answer = run_py(bwrap_client, "def f(:\n    pass")
    assert answer["status"] == "error"
    assert answer["exit_code"] == 1
    assert "SyntaxError" in answer["stderr"]


def test_shell_output_and_exit_code(bwrap_client: TestClient) -> None:
    answer = run_sh(bwrap_client, "echo out; echo err >&2; exit 7")
    assert answer["kind"] == "shell"
    assert answer["status"] == "error"
    assert answer["exit_code"] == 7
    assert answer["stdout"] == "out\n"
    assert answer["stderr"] == "err\n"


def test_shell_ok(bwrap_client: TestClient) -> None:
    answer = run_sh(bwrap_client, "printf '%s-%s\\n' a b")
    assert (answer["status"], answer["exit_code"], answer["stdout"]) == ("ok", 0, "a-b\n")


@pytest.mark.parametrize(
    ("kind", "source", "exit_code"),
    [
        ("python", "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)", 143),
        ("shell", "kill -9 $$", 137),
    ],
)
def test_killed_by_signal(bwrap_client: TestClient, kind: str, source: str, exit_code: int) -> None:
    answer = (run_py if kind == "python" else run_sh)(bwrap_client, source)
    assert answer["status"] == "killed"
    assert answer["exit_code"] == exit_code


def test_output_exactly_at_the_cap_is_not_truncated(
    bwrap_client: TestClient, bwrap_settings: Settings
) -> None:
    cap = Policy().limits.maxima.output_bytes
    exact = run_py(bwrap_client, f"import sys\nsys.stdout.write('x' * {cap})")
    assert exact["status"] == "ok"
    assert len(exact["stdout"]) == cap
    assert exact["stdout_truncated"] is False
    over = run_py(bwrap_client, f"import sys\nsys.stdout.write('y' * {cap + 1})")
    assert over["status"] == "ok"  # above the kept cap, far below the hard cap: not stopped
    assert len(over["stdout"]) == cap
    assert over["stdout_truncated"] is True


# -- stdin, environment, identity ------------------------------------------------------------
def test_stdin_echoed_python(bwrap_client: TestClient) -> None:
    answer = run_py(
        bwrap_client, "import sys\nsys.stdout.write(sys.stdin.read()[::-1])", stdin="hello\nworld"
    )
    assert answer["status"] == "ok"
    assert answer["stdout"] == "dlrow\nolleh"


def test_stdin_echoed_shell_large(bwrap_client: TestClient) -> None:
    """Half a MiB both ways: stdin is fed while stdout is read, no deadlock."""
    data = "".join(f"line {i}\n" for i in range(60_000))[: 512 * 1024]
    answer = run_sh(bwrap_client, "cat", stdin=data, timeout_s=5)
    assert answer["status"] == "ok"
    assert answer["stdout"] == data


def test_unread_stdin_does_not_hang(bwrap_client: TestClient) -> None:
    started = time.monotonic()
    answer = run_py(bwrap_client, "print('done')", stdin="x" * (512 * 1024), timeout_s=5)
    assert answer["status"] == "ok"
    assert answer["stdout"] == "done\n"
    assert time.monotonic() - started < 4


def test_env_visible(bwrap_client: TestClient) -> None:
    env = {"NOX_GREETING": "hello there", "OTHER": "ünïcode"}
    py = run_py(
        bwrap_client,
        "import os\nprint(os.environ['NOX_GREETING'])\nprint(os.environ['OTHER'])",
        env=env,
    )
    assert py["status"] == "ok", py["stderr"]
    assert py["stdout"] == "hello there\nünïcode\n"
    sh = run_sh(bwrap_client, 'echo "$NOX_GREETING|$OTHER"', env=env)
    assert sh["stdout"] == "hello there|ünïcode\n"


def test_env_reaches_the_programs_python_starts(bwrap_client: TestClient) -> None:
    """The run's environment is the process's own (putenv), not only os.environ's copy."""
    code = (
        "import subprocess\n"
        "out = subprocess.run(['/bin/sh', '-c', 'echo \"$NOX_GREETING\"; env'],\n"
        "                     capture_output=True, text=True).stdout\n"
        "print(out)\n"
    )
    answer = run_py(bwrap_client, code, env={"NOX_GREETING": "from the parent"})
    assert answer["status"] == "ok", answer["stderr"]
    lines = answer["stdout"].splitlines()
    assert lines[0] == "from the parent"
    names = {line.partition("=")[0] for line in lines[1:] if "=" in line}
    assert "NOX_GREETING" in names
    assert "PATH" in names
    assert "PYTEST_CURRENT_TEST" not in names


def test_server_environment_not_leaked(bwrap_client: TestClient) -> None:
    assert "PYTEST_CURRENT_TEST" in os.environ
    answer = run_py(bwrap_client, "import os\nprint('\\n'.join(sorted(os.environ)))")
    names = set(answer["stdout"].split())
    assert "PATH" in names
    assert "PYTEST_CURRENT_TEST" not in names
    assert not {n for n in names if n.startswith("NOX_")}


def test_cwd_is_workspace(bwrap_client: TestClient) -> None:
    assert run_py(bwrap_client, "import os\nprint(os.getcwd())")["stdout"] == "/workspace\n"
    assert run_sh(bwrap_client, "pwd")["stdout"] == "/workspace\n"


def test_uid_inside_is_nobody(bwrap_client: TestClient) -> None:
    answer = run_py(bwrap_client, "import os\nprint(os.getuid(), os.geteuid(), os.getgid())")
    assert answer["stdout"].split() == [str(SANDBOX_UID)] * 3
    assert run_sh(bwrap_client, "id -u")["stdout"] == f"{SANDBOX_UID}\n"


# -- the workspace ---------------------------------------------------------------------------
def test_uploaded_file_read_by_next_run(bwrap_client: TestClient) -> None:
    content = os.urandom(4096)
    resp = put(bwrap_client, content, "inputs/data.bin")
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert info["path"] == "inputs/data.bin"
    assert info["size"] == len(content)
    assert info["sha256"] == hashlib.sha256(content).hexdigest()
    answer = run_py(
        bwrap_client,
        "import hashlib\nprint(hashlib.sha256(open('inputs/data.bin','rb').read()).hexdigest())\n"
        "open('inputs/data.bin', 'ab').write(b'more')\nprint('appended')",
    )
    assert answer["status"] == "ok", answer["stderr"]
    assert answer["stdout"].split() == [hashlib.sha256(content).hexdigest(), "appended"]


def test_files_persist_between_runs(bwrap_client: TestClient) -> None:
    first = run_sh(bwrap_client, "mkdir -p out && echo persisted > out/note.txt")
    assert first["status"] == "ok", first["stderr"]
    second = run_py(bwrap_client, "print(open('out/note.txt').read(), end='')")
    assert second["status"] == "ok", second["stderr"]
    assert second["stdout"] == "persisted\n"


def test_files_written_by_a_run_owned_by_sandbox_uid(
    bwrap_client: TestClient, bwrap_settings: Settings
) -> None:
    answer = run_py(
        bwrap_client, "import os\nos.mkdir('made')\nopen('made/file.txt','w').write('x')"
    )
    assert answer["status"] == "ok", answer["stderr"]
    ws = workspace_of(bwrap_settings)
    expected = host_owner(bwrap_settings)
    for path in (ws / "made", ws / "made" / "file.txt"):
        st = os.stat(path, follow_symlinks=False)
        assert (st.st_uid, st.st_gid) == (expected, expected), path


def test_uploaded_file_owned_by_sandbox_uid(
    bwrap_client: TestClient, bwrap_settings: Settings
) -> None:
    assert put(bwrap_client, b"x", "deep/er/up.txt").status_code == 201
    ws = workspace_of(bwrap_settings)
    expected = host_owner(bwrap_settings)
    for path in (ws / "deep", ws / "deep" / "er", ws / "deep" / "er" / "up.txt"):
        assert os.stat(path).st_uid == expected, path


@pytest.mark.parametrize(
    ("path", "filename"),
    [
        ("../x", "u.bin"),
        ("a/../../x", "u.bin"),
        ("./../x", "u.bin"),
        ("..", "u.bin"),
        ("/etc/passwd", "u.bin"),
        ("/tmp/nox-abs-upload", "u.bin"),
        ("a\x00b", "u.bin"),
        (None, "../from-filename.txt"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "dot-dotdot",
        "only-dotdot",
        "abs-etc",
        "abs-tmp",
        "nul",
        "filename-dotdot",
    ],
)
def test_put_bad_paths_refused(
    bwrap_client: TestClient, bwrap_settings: Settings, path: str | None, filename: str
) -> None:
    ws = workspace_of(bwrap_settings)
    data_root = bwrap_settings.data_path
    before = tree_snapshot(data_root, skip=ws)
    passwd = sha256_of("/etc/passwd")
    resp = put(bwrap_client, b"EVIL-UPLOAD", path, filename)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_path"
    assert tree_snapshot(data_root, skip=ws) == before
    assert list((data_root / "staging").iterdir()) == []
    assert sha256_of("/etc/passwd") == passwd
    assert not Path("/tmp/nox-abs-upload").exists()
    assert not (data_root.parent / "x").exists()


def test_put_url_encoded_dots_is_a_literal_name(
    bwrap_client: TestClient, bwrap_settings: Settings
) -> None:
    resp = put(bwrap_client, b"literal", "%2e%2e/x")
    assert resp.status_code == 201, resp.text
    assert resp.json()["path"] == "%2e%2e/x"
    ws = workspace_of(bwrap_settings).resolve()
    target = ws / "%2e%2e" / "x"
    assert target.read_bytes() == b"literal"
    assert ws in target.resolve().parents
    assert not (ws.parent / "x").exists()
    answer = run_py(bwrap_client, "print(open('%2e%2e/x').read())")
    assert answer["stdout"] == "literal\n"


@pytest.mark.parametrize(
    ("link_target", "put_path", "outside"),
    [
        ("/etc", "link/passwd", "/etc/passwd"),
        ("/etc", "link/nox-new-file", "/etc/nox-new-file"),
        ("../../..", "link/nox-escape.txt", None),
    ],
    ids=["etc-passwd", "etc-new", "relative-up"],
)
def test_put_through_symlink_refused(
    bwrap_client: TestClient,
    bwrap_settings: Settings,
    link_target: str,
    put_path: str,
    outside: str | None,
) -> None:
    made = run_py(bwrap_client, f"import os\nos.symlink({link_target!r}, 'link')")
    assert made["status"] == "ok", made["stderr"]
    ws = workspace_of(bwrap_settings)
    assert (ws / "link").is_symlink()
    passwd = sha256_of("/etc/passwd")
    escaped = (ws / link_target / "nox-escape.txt").resolve()
    resp = put(bwrap_client, b"root::0:0::/:/bin/sh\n", put_path)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_path"
    assert sha256_of("/etc/passwd") == passwd
    if outside is not None and outside != "/etc/passwd":
        assert not Path(outside).exists()
    assert not escaped.exists()
    assert (ws / "link").is_symlink()


def test_put_over_a_symlink_to_a_host_file_never_writes_through(
    bwrap_client: TestClient, bwrap_settings: Settings
) -> None:
    made = run_py(bwrap_client, "import os\nos.symlink('/etc/passwd', 'pw')")
    assert made["status"] == "ok", made["stderr"]
    passwd = sha256_of("/etc/passwd")
    resp = put(bwrap_client, b"overwritten?", "pw")
    assert sha256_of("/etc/passwd") == passwd
    if resp.status_code == 201:  # the link itself was replaced by the upload
        target = workspace_of(bwrap_settings) / "pw"
        assert not target.is_symlink()
        assert target.read_bytes() == b"overwritten?"
    else:
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "invalid_path"


def test_a_run_cannot_lock_the_workspace_for_the_next_runs(
    bwrap_client: TestClient, bwrap_settings: Settings
) -> None:
    """A program tries to take the workspace's rights away (refused as root, where the folder
    belongs to root and the sandbox group; undone before the next run otherwise); the next
    sandboxes must still start in it."""
    locked = run_py(
        bwrap_client,
        "import os\ntry:\n    os.chmod('/workspace', 0)\nexcept PermissionError:\n"
        "    print('refused')",
    )
    assert locked["status"] == "ok", locked["stderr"]
    assert put(bwrap_client, b"data", "after-lock.txt").status_code == 201
    for _ in range(2):  # the warm sandbox started before the chmod, then fresh ones
        answer = run_py(bwrap_client, "print(open('after-lock.txt').read())", timeout_s=5)
        assert answer["status"] == "ok", answer["stderr"]
        assert answer["stdout"] == "data\n"
        wait_pool_ready(bwrap_client)


# -- authentication --------------------------------------------------------------------------
@pytest.mark.parametrize("header", [None, "Bearer not-a-real-token", "Basic abc", "Bearer "])
@pytest.mark.parametrize("route", ["/run_py", "/run_sh"])
def test_unauthenticated_runs_refused(
    bwrap_client: TestClient, bwrap_settings: Settings, header: str | None, route: str
) -> None:
    marker = f"unauth-{route.strip('/')}"
    body = {"code": f"open({marker!r}, 'w')"} if route == "/run_py" else {"cmd": f"touch {marker}"}
    request = bwrap_client.build_request("POST", route, json=body)
    del request.headers["Authorization"]
    if header is not None:
        request.headers["Authorization"] = header
    resp = bwrap_client.send(request)
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == "unauthorized"
    assert not (workspace_of(bwrap_settings) / marker).exists()


def test_unauthenticated_upload_refused(bwrap_client: TestClient, bwrap_settings: Settings) -> None:
    resp = bwrap_client.post(
        "/put",
        files={"file": ("f.txt", b"x")},
        data={"path": "unauth.txt"},
        headers={"Authorization": "Bearer wrong"},
    )
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthorized"
    assert not (workspace_of(bwrap_settings) / "unauth.txt").exists()


def test_viewer_may_not_run(bwrap_client: TestClient, make_token, bwrap_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    viewer = make_token(Role.VIEWER)
    resp = bwrap_client.post(
        "/run_sh", json={"cmd": "touch viewer-ran"}, headers={"Authorization": f"Bearer {viewer}"}
    )
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "forbidden"
    assert not (workspace_of(bwrap_settings) / "viewer-ran").exists()
    runner = make_token(Role.RUNNER)
    resp = bwrap_client.post(
        "/run_sh", json={"cmd": "echo ran"}, headers={"Authorization": f"Bearer {runner}"}
    )
    assert resp.status_code == 200
    assert resp.json()["stdout"] == "ran\n"


# -- the warm pool and concurrency -----------------------------------------------------------
def test_warm_pool_serves_consecutive_runs(bwrap_client: TestClient) -> None:
    sandbox = bwrap_client.app.state.nox.sandbox  # type: ignore[attr-defined]
    wait_pool_ready(bwrap_client)
    before = sandbox.pool_stats()
    first = run_py(bwrap_client, "print('first')")
    wait_pool_ready(bwrap_client)
    middle = sandbox.pool_stats()
    second = run_py(bwrap_client, "print('second')")
    after = sandbox.pool_stats()
    assert (first["stdout"], second["stdout"]) == ("first\n", "second\n")
    assert middle.hits == before.hits + 1
    assert after.hits == middle.hits + 1
    assert after.misses == before.misses


def test_parallel_runs(bwrap_client: TestClient) -> None:
    def one(i: int) -> dict[str, Any]:
        return run_py(bwrap_client, f"import time\ntime.sleep(0.2)\nprint({i})", timeout_s=10)

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(4)))
    assert [a["stdout"] for a in answers] == [f"{i}\n" for i in range(4)]
    assert all(a["status"] == "ok" for a in answers)
    assert time.monotonic() - started < 8


def test_another_server_starting_leaves_running_sandboxes_alone(bwrap_client: TestClient) -> None:
    """Two Nox servers on one host (or a test run beside a dev server) must not kill each
    other's sandboxes: a server starting must not touch the other's cgroups."""
    result: dict[str, Any] = {}

    def long_run() -> None:
        result["answer"] = run_py(
            bwrap_client, "import time\ntime.sleep(1.5)\nprint('survived')", timeout_s=8
        )

    wait_pool_ready(bwrap_client)
    worker = threading.Thread(target=long_run)
    worker.start()
    time.sleep(0.5)  # the run is under way
    other_data = Path(tempfile.mkdtemp(prefix="nox-second-", dir=os.path.realpath("/tmp")))
    other_data.chmod(0o711)
    try:
        with own_server(other_data, pool_size=0) as other:
            assert run_py(other, "print(2)")["stdout"] == "2\n"
    finally:
        shutil.rmtree(other_data, ignore_errors=True)
        worker.join(timeout=15)
    assert not worker.is_alive()
    answer = result["answer"]
    assert answer["status"] == "ok", answer
    assert answer["stdout"] == "survived\n"
