# The program every sandbox starts with, passed to ``python3 -I -S -c``.
#
# It starts ahead of time (the warm pool) and blocks reading its orders from the descriptor
# named by its first argument.
# The orders are one JSON document: the limits to apply, the environment, and what to run.
# It lowers its own resource limits first (lowering is always allowed, raising back is not),
# then either runs Python code in this already started interpreter as ``__main__`` or replaces
# itself with ``/bin/sh -c``. Standard input, output and error are the run's own pipes.
#
# This file is executed inside the sandbox, so it imports nothing from Nox and only the
# standard library modules an ``-I -S`` interpreter already has at hand.
import json
import os
import resource
import sys


def _read_orders() -> dict:  # type: ignore[type-arg]
    fd = int(sys.argv[1])  # the control pipe's number, given by the launcher
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    if not chunks:  # the server went away before using this sandbox
        os._exit(0)
    orders: dict = json.loads(b"".join(chunks))  # type: ignore[type-arg]
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


def _run_python(code: str) -> None:
    import _sitebuiltins
    import builtins
    import types

    # -S skips `site`, which is what defines exit() and quit(); programs expect them.
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")

    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    sys.argv[:] = ["-c"]
    try:
        compiled = compile(code, "<string>", "exec")
    except (SyntaxError, ValueError) as exc:  # as `python -c` shows it: no traceback header
        import traceback

        traceback.print_exception(type(exc), exc, None)
        sys.stderr.flush()
        sys.exit(1)
    try:
        exec(compiled, main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        import traceback

        tb = exc.__traceback__
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next  # hide this file's frame: the trace starts in the user's code
        traceback.print_exception(type(exc), exc, tb)
        sys.stderr.flush()
        sys.exit(1)


def _main() -> None:
    orders = _read_orders()
    _apply_limits(orders["rlimits"])
    os.environ.clear()
    os.environ.update(orders["env"])
    os.umask(0o022)
    if orders["kind"] == "shell":
        os.execve("/bin/sh", ["sh", "-c", orders["source"]], orders["env"])
    _run_python(orders["source"])


_main()
