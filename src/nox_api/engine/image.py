"""The bootstrap, compiled once, for every sandbox to run without compiling it again.

``python -c SOURCE`` compiles the bootstrap's 170 lines at every sandbox start (about 1.5-2 ms
here, a tenth of a cold start). Instead, at start-up the sandbox's own interpreter compiles it
(so the byte code matches that interpreter, whatever runs the server) into a ``.pyc`` image held
in a sealed memfd: no write, grow, shrink or new seal is possible any more, by anyone, so code in
one sandbox cannot change what the next one runs. Each sandbox inherits a read-only descriptor of
it and runs ``python -I -S /proc/self/fd/N``; the bootstrap closes that descriptor first thing.
Where memfds or seals are missing, :func:`build_image` returns None and :class:`Bootstrap`, which
the launchers use, falls back to ``-c``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess

__all__ = ["Bootstrap", "BootstrapImage", "build_image"]

log = logging.getLogger("nox.engine")

# Run by the sandbox interpreter: source on stdin, a .pyc on stdout (magic, 12 bytes of flags
# and source stamp that running a .pyc directly does not check, the marshalled code).
_COMPILE = (
    "import importlib.util, marshal, sys\n"
    "code = compile(sys.stdin.buffer.read(), '<nox-bootstrap>', 'exec')\n"
    "sys.stdout.buffer.write(importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code))\n"
)
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class BootstrapImage:
    """A read-only descriptor of the sealed, compiled bootstrap; lives as long as the server."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def argv(self) -> list[str]:
        """What follows the interpreter on the command line (then the bootstrap's arguments)."""
        return ["-I", "-S", f"/proc/self/fd/{self.fd}"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def build_image(python: str, source: str) -> BootstrapImage | None:
    try:
        compiled = subprocess.run(
            [python, "-I", "-S", "-c", _COMPILE],
            input=source.encode(), capture_output=True, check=True, timeout=30,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not compile the sandbox bootstrap ahead (%s): using -c", exc)
        return None
    memfd = -1
    try:
        memfd = os.memfd_create("nox-bootstrap", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        view = memoryview(compiled)
        while view:
            view = view[os.write(memfd, view) :]
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
        # A descriptor opened read-only: the sandboxes get this one, never the writable one.
        readonly = os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, AttributeError) as exc:
        log.warning("could not seal the sandbox bootstrap in a memfd (%s): using -c", exc)
        return None
    finally:
        if memfd >= 0:
            with contextlib.suppress(OSError):
                os.close(memfd)
    return BootstrapImage(readonly)


class Bootstrap:
    """How a launcher starts the bootstrap: the arguments after the interpreter and the
    descriptors its sandboxes inherit; the sealed image when it could be built, else ``-c``."""

    def __init__(self, python: str, source: str) -> None:
        self._source = source
        self.image = build_image(python, source)

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.image is None else (self.image.fd,)

    def argv(self) -> list[str]:
        return ["-I", "-S", "-c", self._source] if self.image is None else self.image.argv()

    def close(self) -> None:
        """Release the image (the sandboxes started from it keep their copy)."""
        if self.image is not None:
            self.image.close()
            self.image = None
