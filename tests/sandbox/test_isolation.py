"""What a sandboxed program cannot see or touch: the network, host files and processes, the
file system outside /workspace and /tmp, dangerous system calls and capabilities."""

from __future__ import annotations

import errno
import os
import platform
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from nox_api.config import Settings, load_settings
from nox_api.services.policy import Policy

from ._helpers import SANDBOX_UID, run_py, run_sh

pytestmark = pytest.mark.sandbox

# A sandbox starts three ways: taken from the warm pool, grown from a stem (cgroup joined ahead,
# workspace given at run time through bwrap's --args), or started from nothing. Every check
# here runs on each, so a difference between their command lines cannot open a hole.
START_PATHS = {
    "warm": {"pool_size": 1, "pool_stems": 0},
    "stem": {"pool_size": 0, "pool_stems": 2},
    "fresh": {"pool_size": 0, "pool_stems": 0},
}


@pytest.fixture(params=list(START_PATHS))
def start_path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def bwrap_settings(start_path: str, data_dir: Path) -> Settings:
    return load_settings(data_dir=data_dir, **START_PATHS[start_path])


def test_runs_take_the_start_path_under_test(
    bwrap_client: TestClient, bwrap_settings: Settings, start_path: str
) -> None:
    sandbox = bwrap_client.app.state.nox.sandbox  # type: ignore[attr-defined]
    full = (bwrap_settings.pool_size, bwrap_settings.pool_stems)
    deadline = time.monotonic() + 10
    while (sandbox.pool_stats().ready, sandbox.stem_stats().ready) != full:
        assert time.monotonic() < deadline, "the pools did not fill"
        time.sleep(0.02)
    pool_hits, stem_hits = sandbox.pool_stats().hits, sandbox.stem_stats().hits
    assert run_py(bwrap_client, "print(1)")["stdout"] == "1\n"
    used = (sandbox.pool_stats().hits - pool_hits, sandbox.stem_stats().hits - stem_hits)
    assert used == {"warm": (1, 0), "stem": (0, 1), "fresh": (0, 0)}[start_path]


def require_x86_64() -> None:
    if platform.machine() != "x86_64":
        pytest.skip("system call numbers below are x86_64's")


# -- network ---------------------------------------------------------------------------------
@contextmanager
def tcp_listener() -> Iterator[tuple[int, list[Any]]]:
    """A listener on 127.0.0.1 (port chosen by the kernel) that records every connection."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.05)
    accepted: list[Any] = []
    stop = threading.Event()

    def serve() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                conn, addr = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(addr)
            conn.close()

    thread = threading.Thread(target=serve, name="nox-test-listener", daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(timeout=5)
        srv.close()


def test_no_network_to_a_host_listener(bwrap_client: TestClient) -> None:
    with tcp_listener() as (port, accepted):
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the listener works: the host can reach it
        deadline = time.monotonic() + 2
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(accepted) == 1
        code = (
            "import socket\n"
            "try:\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "except OSError as exc:\n"
            "    print('FAILED', exc.errno)\n"
            "else:\n"
            "    s.sendall(b'escaped')\n"
            "    print('CONNECTED')\n"
        )
        answer = run_py(bwrap_client, code, timeout_s=5)
        time.sleep(0.2)  # a connection that got through would be accepted by now
        assert answer["status"] == "ok", answer["stderr"]
        assert answer["stdout"].startswith("FAILED"), answer["stdout"]
        assert len(accepted) == 1, "the sandbox reached the host listener"


@pytest.mark.parametrize("family", ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"])
def test_non_unix_sockets_refused(bwrap_client: TestClient, family: str) -> None:
    code = (
        "import socket\n"
        "try:\n"
        f"    socket.socket(socket.{family}, socket.SOCK_DGRAM)\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
        "else:\n"
        "    print('CREATED')\n"
    )
    answer = run_py(bwrap_client, code)
    assert answer["stdout"].strip() == str(errno.EAFNOSUPPORT)  # 97


def test_unix_sockets_still_work(bwrap_client: TestClient) -> None:
    code = "import socket\na, b = socket.socketpair()\na.sendall(b'ping')\nprint(b.recv(4))"
    assert run_py(bwrap_client, code)["stdout"] == "b'ping'\n"


def test_only_loopback_interface(bwrap_client: TestClient) -> None:
    code = "print([l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]])"
    assert run_py(bwrap_client, code)["stdout"] == "['lo']\n"


# -- host files ------------------------------------------------------------------------------
def test_etc_shadow_unreadable(bwrap_client: TestClient) -> None:
    code = (
        "try:\n"
        "    data = open('/etc/shadow').read()\n"
        "except OSError as exc:\n"
        "    print('DENIED', exc.errno)\n"
        "else:\n"
        "    print('READ', len(data))\n"
    )
    answer = run_py(bwrap_client, code)
    assert answer["stdout"].startswith("DENIED"), answer["stdout"]
    shell = run_sh(bwrap_client, "cat /etc/shadow")
    assert shell["status"] == "error"
    assert shell["stdout"] == ""


def test_host_files_invisible(bwrap_client: TestClient, bwrap_settings: Settings) -> None:
    other = bwrap_settings.workspaces_dir / "other"
    other.mkdir(mode=0o755)
    secret = other / "secret.txt"
    secret.write_text("other tenant")
    secret.chmod(0o644)
    host_tmp = Path(os.path.realpath("/tmp")) / f"nox-host-{secrets.token_hex(6)}"
    host_tmp.write_text("host")
    host_tmp.chmod(0o644)
    try:
        paths = [
            str(bwrap_settings.data_path / "nox.db"),
            str(secret),
            "/workspace/../other/secret.txt",
            str(host_tmp),
            "/root",
            "/home",
            "/var",
        ]
        code = f"import os\nfor p in {paths!r}:\n    print(os.path.exists(p))"
        answer = run_py(bwrap_client, code)
        assert answer["stdout"].split() == ["False"] * len(paths), list(
            zip(paths, answer["stdout"].split(), strict=False)
        )
    finally:
        host_tmp.unlink()


# -- nothing writable outside /workspace and /tmp --------------------------------------------
_WRITE_PROBE = """
import os
p = {path!r}
exists = os.path.lexists(p)
flags = os.O_WRONLY | (0 if exists else os.O_CREAT | os.O_EXCL)
try:
    fd = os.open(p, flags, 0o600)  # opened, never written: a host file stays intact
except OSError as exc:
    print('DENIED', exc.errno)
else:
    os.close(fd)
    if not exists:
        os.unlink(p)
    print('WRITABLE')
"""


@pytest.mark.parametrize(
    "path",
    [
        "/nox-probe",
        "/workspace/../nox-probe",
        "/usr/nox-probe",
        "/usr/bin/nox-probe",
        "/usr/bin/env",
        "/etc/nox-probe",
        "/etc/ld.so.cache",
        "/proc/sys/kernel/hostname",
        "/proc/sysrq-trigger",
        "/sys/nox-probe",
        "/dev/nox-probe",
    ],
)
def test_not_writable_outside_workspace_and_tmp(bwrap_client: TestClient, path: str) -> None:
    answer = run_py(bwrap_client, _WRITE_PROBE.format(path=path))
    assert answer["status"] == "ok", answer["stderr"]
    assert answer["stdout"].startswith("DENIED"), f"{path} is writable in the sandbox"
    if path.startswith(("/usr/", "/etc/")) and "nox-probe" in path:
        assert not Path(path).exists()


def test_mkdir_outside_refused(bwrap_client: TestClient) -> None:
    answer = run_sh(bwrap_client, "mkdir /nox-dir || mkdir /usr/nox-dir || mkdir /etc/nox-dir")
    assert answer["status"] == "error"
    assert not Path("/usr/nox-dir").exists()
    assert not Path("/etc/nox-dir").exists()


def test_workspace_and_tmp_writable(bwrap_client: TestClient) -> None:
    for path in ("/workspace/w-probe", "/tmp/t-probe"):
        answer = run_py(bwrap_client, _WRITE_PROBE.format(path=path))
        assert answer["stdout"] == "WRITABLE\n", path


def test_tmp_private_per_run(bwrap_client: TestClient) -> None:
    marker = f"/tmp/nox-marker-{secrets.token_hex(6)}"
    first = run_py(
        bwrap_client, f"open({marker!r}, 'w').write('x')\nimport os\nprint(os.listdir('/tmp'))"
    )
    assert first["status"] == "ok", first["stderr"]
    assert os.path.basename(marker) in first["stdout"]
    assert not Path(marker).exists(), "the sandbox's /tmp is the host's"
    second = run_py(bwrap_client, f"import os\nprint(os.path.exists({marker!r}))")
    assert second["stdout"] == "False\n"


def test_tmp_size_capped(bwrap_client: TestClient, bwrap_settings: Settings) -> None:
    cap_mib = Policy().limits.maxima.tmp_size_mib
    code = f"""
import errno, os
block = b'x' * (1 << 20)
total, failure, i = 0, None, 0
try:
    while total < {2 * cap_mib} << 20:  # files of 8 MiB: below the file size limit
        fd = os.open(f'/tmp/fill{{i}}', os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(8):
                total += os.write(fd, block)
        finally:
            os.close(fd)
        i += 1
except OSError as exc:
    failure = errno.errorcode[exc.errno]
print(total, failure)
"""
    answer = run_py(bwrap_client, code, timeout_s=10)
    assert answer["status"] == "ok", answer["stderr"]
    assert answer["limits"]["tmp_size_mib"] == cap_mib
    written, failure = answer["stdout"].split()
    assert failure == "ENOSPC"
    assert (cap_mib - 1) << 20 <= int(written) <= cap_mib << 20


# -- host processes --------------------------------------------------------------------------
def test_host_processes_invisible(bwrap_client: TestClient) -> None:
    me = os.getpid()
    code = f"""
import os
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
print(os.getpid())
print(pids)
for p in pids:
    try:
        print(open(f'/proc/{{p}}/cmdline', 'rb').read().replace(b'\\0', b' ').decode())
    except OSError:
        print('?')
try:
    os.kill({me}, 0)
except ProcessLookupError:
    print('ESRCH')
except OSError as exc:
    print('ERR', exc.errno)
else:
    print('SIGNALLED')
"""
    answer = run_py(bwrap_client, code)
    assert answer["status"] == "ok", answer["stderr"]
    lines = answer["stdout"].splitlines()
    own_pid = int(lines[0])
    pids = eval(lines[1])  # noqa: S307 - a list of ints printed by the sandbox
    assert own_pid <= 3
    assert len(pids) <= 3
    assert max(pids) <= 3
    assert me not in pids
    assert not any("pytest" in line for line in lines[2:-1])
    assert lines[-1] == "ESRCH"
    assert int(run_sh(bwrap_client, "echo $$")["stdout"]) <= 3


# -- system calls ----------------------------------------------------------------------------
_SYSCALL_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long
buf = ctypes.create_string_buffer(512)
ctypes.set_errno(0)
ret = {call}
err = ctypes.get_errno()
if ret == 0 and {forks}:
    os._exit(0)  # a clone that went through: the child must not print
print(ret, err)
"""

_SYSCALLS = {
    # name: (call, expected errno, forks)
    "ptrace": ("libc.ptrace(L(0), L(0), None, None)", errno.EPERM, False),  # PTRACE_TRACEME
    "unshare": ("libc.unshare(0x10000000)", errno.EPERM, False),  # CLONE_NEWUSER
    "mount": ("libc.mount(b'none', b'/tmp', b'tmpfs', L(0), None)", errno.EPERM, False),
    "keyctl": ("libc.syscall(L(250), L(0), L(-3), L(0))", errno.EPERM, False),
    "add_key": ("libc.syscall(L(248), b'user', b'k', b'v', L(1), L(-3))", errno.EPERM, False),
    "bpf": ("libc.syscall(L(321), L(0), buf, L(72))", errno.EPERM, False),
    "io_uring_setup": ("libc.syscall(L(425), L(1), buf)", errno.EPERM, False),
    "perf_event_open": ("libc.syscall(L(298), buf, L(0), L(-1), L(-1), L(0))", errno.EPERM, False),
    "userfaultfd": ("libc.syscall(L(323), L(0))", errno.EPERM, False),
    "setns": ("libc.syscall(L(308), L(0), L(0))", errno.EPERM, False),
    "pivot_root": ("libc.syscall(L(155), b'/tmp', b'/tmp')", errno.EPERM, False),
    "process_vm_readv": (
        "libc.syscall(L(310), L(1), buf, L(1), buf, L(1), L(0))",
        errno.EPERM,
        False,
    ),
    "open_tree": ("libc.syscall(L(428), L(-100), b'/tmp', L(1))", errno.EPERM, False),
    "clone_newuser": (  # clone(CLONE_NEWUSER | SIGCHLD)
        "libc.syscall(L(56), L(0x10000000 | 17), L(0), L(0), L(0), L(0))",
        errno.EPERM,
        True,
    ),
    "clone3": ("libc.syscall(L(435), buf, L(88))", errno.ENOSYS, True),
}


@pytest.mark.parametrize("name", list(_SYSCALLS))
def test_dangerous_syscalls_blocked(bwrap_client: TestClient, name: str) -> None:
    require_x86_64()
    call, expected, forks = _SYSCALLS[name]
    answer = run_py(bwrap_client, _SYSCALL_PROBE.format(call=call, forks=forks))
    assert answer["status"] == "ok", answer["stderr"]
    ret, err = answer["stdout"].split()
    assert (int(ret), int(err)) == (-1, expected), f"{name}: {errno.errorcode.get(int(err))}"


def test_ordinary_syscalls_still_work(bwrap_client: TestClient) -> None:
    """The filter is not a blanket: fork, threads and subprocesses work."""
    code = (
        "import subprocess, threading\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        "print(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout, end='')"
    )
    answer = run_py(bwrap_client, code)
    assert answer["status"] == "ok", answer["stderr"]
    assert answer["stdout"] == "thread\nchild\n"


def test_terminal_injection_ioctls_blocked(bwrap_client: TestClient) -> None:
    # on a pipe the kernel itself answers ENOTTY: EPERM can only come from the filter
    code = """
import errno, fcntl, os, termios
r, w = os.pipe()
for name, request in (('TIOCSTI', termios.TIOCSTI), ('TIOCLINUX', 0x541C)):
    try:
        fcntl.ioctl(w, request, b'x')
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
    else:
        print(name, 'ALLOWED')
try:
    fcntl.ioctl(w, termios.TIOCGWINSZ, b'\\0' * 8)
except OSError as exc:
    print('TIOCGWINSZ', errno.errorcode[exc.errno])
"""
    answer = run_py(bwrap_client, code)
    assert answer["status"] == "ok", answer["stderr"]
    assert answer["stdout"].splitlines() == [
        "TIOCSTI EPERM",
        "TIOCLINUX EPERM",
        "TIOCGWINSZ ENOTTY",  # other ioctls reach the kernel
    ]


# -- capabilities and identity ---------------------------------------------------------------
def test_no_capabilities(bwrap_client: TestClient) -> None:
    code = """
import os
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
for key in ('CapEff', 'CapPrm', 'CapInh', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp'):
    print(key, status[key].strip())
"""
    answer = run_py(bwrap_client, code)
    fields = dict(line.split() for line in answer["stdout"].splitlines())
    for cap in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # filter mode


def test_cannot_become_root(bwrap_client: TestClient) -> None:
    code = """
import os
for name, call in (('setuid', lambda: os.setuid(0)), ('setgid', lambda: os.setgid(0)),
                   ('seteuid', lambda: os.seteuid(0)), ('setgroups', lambda: os.setgroups([0]))):
    try:
        call()
    except OSError as exc:
        print(name, 'FAILED', exc.errno)
    else:
        print(name, 'WORKED')
print(os.getuid(), os.geteuid(), os.getgid())
"""
    answer = run_py(bwrap_client, code)
    lines = answer["stdout"].splitlines()
    assert all(" FAILED " in line for line in lines[:4]), lines
    assert lines[4].split() == [str(SANDBOX_UID)] * 3
