# The program every sandbox starts with: ``python3 -I -S /proc/self/fd/N``, N a sealed memfd of
# this file compiled once by the server (see image.py), or ``python3 -I -S -c`` with this source.
#
# It starts ahead of time (the warm pool): it does everything that does not depend on the run
# (imports, exit() and quit(), the __main__ module), then blocks reading its orders from the
# descriptor named by its first argument.
# The orders are one dict in the marshal format (built in, where json would import re and enum,
# 6 ms of every sandbox's start): the limits to apply, the environment, and what to run.
# It lowers its own resource limits first (lowering is always allowed, raising back is not),
# then either runs Python code in this already started interpreter as ``__main__`` or replaces
# itself with ``/bin/sh -c``. Standard input, output and error are the run's own pipes.
#
# After Python code it does what the interpreter does at exit (wait for threads, run atexit
# functions, release the program's objects so open files get flushed, flush the standard
# streams), then writes the exit code and its CPU time to the status descriptor (the second
# argument) and leaves with posix._exit. The server answers as soon as it reads that line instead of
# waiting for the interpreter and the sandbox to be torn down (about 4 ms here).
#
# This file is executed inside the sandbox, so it imports nothing from Nox, and only small
# standard modules: every import here is paid by every sandbox start. traceback (and the re it
# pulls in) is imported only when the program fails. It uses the built-in ``posix`` rather than
# ``os``: importing os (and the collections.abc, stat and posixpath it pulls in) cost 1.3-1.7 ms
# of a cold start here; a program that wants os imports it and finds the run's environment.
import _sitebuiltins
import builtins
import gc
import marshal
import posix
import resource
import sys

# -S skips `site`, which is what defines exit() and quit(); programs expect them.
builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")


def _read_orders() -> dict:  # type: ignore[type-arg]
    fd = int(sys.argv[1])  # the control pipe's number, given by the launcher
    chunks = []
    while True:
        chunk = posix.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    posix.close(fd)
    if not chunks:  # the server went away before using this sandbox
        posix._exit(0)
    orders: dict = marshal.loads(b"".join(chunks))  # type: ignore[type-arg]
    return orders


def _apply_limits(limits: dict) -> None:  # type: ignore[type-arg]
    for name, value in limits.items():
        res = getattr(resource, name)
        if name == "RLIMIT_CPU":  # counted from process start: add what start-up used
            used = resource.getrusage(resource.RUSAGE_SELF)
            value = int(used.ru_utime + used.ru_stime) + value
            resource.setrlimit(res, (value, value + 1))  # SIGXCPU first, SIGKILL a second later
        else:
            resource.setrlimit(res, (value, value))


MYPY = False
if MYPY:  # for the type checker only: importing types costs every sandbox's start
    import types

ModuleType = type(sys)  # types.ModuleType, without importing types


def _print_exception(exc: BaseException, tb: "types.TracebackType | None") -> None:
    import traceback

    traceback.print_exception(type(exc), exc, tb)


def _exit_code(exc: SystemExit) -> int:
    """What the interpreter makes of ``sys.exit(x)``."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except Exception:  # as the interpreter: a failing stderr loses the message
        pass
    return 1


def _run_python(code: str, main: "types.ModuleType") -> int:
    try:
        compiled = compile(code, "<string>", "exec")
    except (SyntaxError, ValueError) as exc:  # as `python -c` shows it: no traceback header
        _print_exception(exc, None)
        return 1
    try:
        exec(compiled, main.__dict__)
    except SystemExit as exc:
        return _exit_code(exc)
    except BaseException as exc:
        tb = exc.__traceback__
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next  # hide this file's frame: the trace starts in the user's code
        _print_exception(exc, tb)
        return 1
    return 0


def _finish(code: int, main: "types.ModuleType") -> int:
    """The interpreter's own exit steps, in its order, before posix._exit skips the rest."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()  # waits for non-daemon threads
        import atexit

        atexit._run_exitfuncs()
        main.__dict__.clear()  # drop the program's objects: files it left open get flushed
        gc.collect()
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException as exc:
        _print_exception(exc, exc.__traceback__)
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            code = code or 120  # as CPython does when flushing at exit fails
    return code


def _report(status_fd: int, code: int) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_ms = 1000.0 * (usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime)
    try:
        posix.write(status_fd, f"{code} {cpu_ms:.3f}\n".encode())
    except OSError:  # the server then sees the exit instead
        pass


def _set_environment(env: dict) -> None:  # type: ignore[type-arg]
    """Make ``env`` the whole environment: of this process (for the programs it starts) and of
    the ``os.environ`` that importing os will build from ``posix.environ``."""
    loaded = sys.modules.get("os")
    if loaded is not None:  # an interpreter whose start-up imported os already
        loaded.environ.clear()
        loaded.environ.update(env)
        return
    for key in list(posix.environ):
        posix.unsetenv(key)
    posix.environ.clear()
    encoding = sys.getfilesystemencoding()
    for key, value in env.items():
        posix.putenv(key, value)
        posix.environ[key.encode(encoding, "surrogateescape")] = value.encode(
            encoding, "surrogateescape"
        )


def _main() -> None:
    if sys.argv[0].startswith("/proc/self/fd/"):  # run from the server's compiled image
        try:
            posix.close(int(sys.argv[0].rpartition("/")[2]))  # the program never gets it
        except (OSError, ValueError):
            pass
    status_fd = int(sys.argv[2]) if len(sys.argv) > 2 else -1
    if status_fd >= 0:
        posix.set_inheritable(status_fd, False)  # the program's children and /bin/sh never get it
    main = ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    compile("pass", "<warm-up>", "exec")  # the first compile() costs a millisecond: pay it now
    gc.freeze()  # what exists now is never garbage: the collection at the end skips it
    orders = _read_orders()
    if posix.getpriority(posix.PRIO_PROCESS, 0) > 0:  # started nice by the pool: normal now
        try:
            posix.setpriority(posix.PRIO_PROCESS, 0, 0)
        except OSError:  # no RLIMIT_NICE for it here: stays nice
            pass
    _apply_limits(orders["rlimits"])
    _set_environment(orders["env"])
    posix.umask(0o022)
    if orders["kind"] == "shell":
        posix.execve("/bin/sh", ["sh", "-c", orders["source"]], orders["env"])
    sys.modules["__main__"] = main
    sys.argv[:] = ["-c"]
    code = _finish(_run_python(orders["source"], main), main)
    if status_fd >= 0:
        _report(status_fd, code)
    posix._exit(code)


_main()
