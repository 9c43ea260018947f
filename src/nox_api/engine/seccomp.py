"""The seccomp filter every sandbox runs under, compiled once with libseccomp.

Policy (DESIGN.md, "The sandbox engine"): allow by default, and make the calls that widen the
attack surface of the kernel fail cleanly, so that ordinary programs keep working and an escape
attempt sees an error instead of a crash:

- ``EPERM``: debugging other processes, mounting, namespaces, kernel keyrings, eBPF, perf,
  userfaultfd, io_uring, kernel modules, kexec, and a handful of host-administration calls;
- ``clone`` with any namespace flag gets ``EPERM``; ``clone3`` gets ``ENOSYS`` (its flags live in
  memory a filter cannot read; libc then falls back to ``clone``);
- ``socket`` for any family but ``AF_UNIX`` gets ``EAFNOSUPPORT``;
- the ``TIOCSTI`` and ``TIOCLINUX`` ioctls (terminal injection) get ``EPERM``;
- a system call of a foreign architecture kills the process.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from functools import cache

__all__ = ["BLOCKED_EPERM", "SeccompUnavailable", "compile_filter", "filter_fd"]

BLOCKED_EPERM: tuple[str, ...] = (
    # other processes' memory
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    # mounts and the new mount API, root changes
    "mount",
    "umount2",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "pivot_root",
    "chroot",
    # namespaces
    "unshare",
    "setns",
    # kernel keyrings
    "keyctl",
    "add_key",
    "request_key",
    # large kernel attack surfaces
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # kernel modules and kexec
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    # host administration
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "syslog",
    "quotactl",
    "name_to_handle_at",
    "open_by_handle_at",
    "vhangup",
    "iopl",
    "ioperm",
    "fanotify_init",
    "lookup_dcookie",
)

_CLONE_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)
_TIOCSTI = 0x5412
_TIOCLINUX = 0x541C


class SeccompUnavailable(RuntimeError):
    """libseccomp (the shared library or its binding) cannot be loaded or used."""


@cache
def compile_filter() -> bytes:
    """Return the filter as classic BPF bytes, as ``bwrap --seccomp FD`` reads it."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # the binding loads libseccomp.so.2 with ctypes
        raise SeccompUnavailable(
            f"libseccomp cannot be loaded ({exc}); install the libseccomp2 package"
        ) from exc

    filt = sc.SyscallFilter(sc.ALLOW)
    filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    eperm = sc.ERRNO(errno.EPERM)
    for name in BLOCKED_EPERM:
        try:
            filt.add_rule(eperm, name)
        except (OSError, ValueError, RuntimeError):
            continue  # not a system call on this architecture (iopl on arm64, say)
    for flag in _CLONE_NAMESPACE_FLAGS:
        filt.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    filt.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, int(socket.AF_UNIX)))
    for request in (_TIOCSTI, _TIOCLINUX):
        filt.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))

    with tempfile.TemporaryFile() as buf:
        filt.export_bpf(buf)
        buf.seek(0)
        program = buf.read()
    if not program or len(program) % 8:
        raise SeccompUnavailable("libseccomp exported an empty or malformed BPF program")
    return program


def filter_fd() -> int:
    """A fresh descriptor positioned at the start of the compiled filter.

    ``bwrap`` reads the descriptor to its end, so each sandbox needs its own; a memfd costs
    two system calls and never touches the disk. The caller closes it after the spawn.
    """
    program = compile_filter()
    fd = os.memfd_create("nox-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
