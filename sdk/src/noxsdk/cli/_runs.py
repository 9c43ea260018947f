"""``noxctl run-py`` and ``noxctl run-sh``: run code in a sandbox, pass its output through.

The program's stdout goes to stdout and its stderr to stderr exactly as the server sent them,
and ``noxctl`` exits with the program's exit code (see :func:`~noxsdk.cli._exits.run_exit_code`:
124 on a timeout, 137 on the memory limit). With ``--json`` the whole Execution is printed
instead, and the exit code is the same.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from noxsdk import Execution
from noxsdk.cli._exits import run_exit_code
from noxsdk.cli._render import emit_json, write_exact
from noxsdk.cli._session import JsonOpt, Session, session_of

__all__ = ["register"]

PANEL = "Run code"
_STDIN = "-"

StdinFileOpt = Annotated[
    str | None,
    typer.Option(
        "--stdin-file",
        metavar="PATH",
        help="Feed this local text file to the program's stdin (- for noxctl's own stdin).",
    ),
]
EnvOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--env",
        "-e",
        metavar="NAME=VALUE",
        help="Set an environment variable for the program (repeat the option for more).",
    ),
]
RunTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        min=0.001,
        help="The run's wall-clock limit (default and maximum: the server's policy).",
    ),
]
MemoryOpt = Annotated[
    int | None,
    typer.Option(
        "--memory",
        metavar="MIB",
        min=1,
        help="The run's memory limit in MiB (default and maximum: the server's policy).",
    ),
]


def _read_text(name: str, hint: str) -> str:
    """The text of local file ``name``, or of stdin for ``-``."""
    if name == _STDIN:
        return sys.stdin.read()
    try:
        return Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {name}: {exc.strerror}", param_hint=hint) from None
    except UnicodeDecodeError:
        raise typer.BadParameter(f"{name} is not UTF-8 text", param_hint=hint) from None


def _environment(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="'--env'")
        env[name] = value
    return env


def _run(
    session: Session,
    *,
    python: bool,
    source: str,
    source_from_stdin: bool,
    stdin_file: str | None,
    env: list[str] | None,
    timeout: float | None,
    memory: int | None,
) -> None:
    if stdin_file == _STDIN and source_from_stdin:
        raise typer.BadParameter(
            "stdin already holds the code; give the program's input as a file",
            param_hint="'--stdin-file'",
        )
    stdin = None if stdin_file is None else _read_text(stdin_file, "'--stdin-file'")
    variables = _environment(env)
    with session.client() as client:
        run = client.run_py if python else client.run_sh
        execution = run(source, stdin=stdin, timeout_s=timeout, memory_mib=memory, env=variables)
    if session.json:
        emit_json(execution)
    else:
        write_exact(sys.stdout, execution.stdout)
        write_exact(sys.stderr, execution.stderr)
        _remark(execution)
    code = run_exit_code(execution)
    if code:
        raise typer.Exit(code)


def _remark(execution: Execution) -> None:
    """On a terminal only (piped output stays exact): why the run ended, if not by itself."""
    if not sys.stderr.isatty():
        return
    remarks = []
    if execution.status not in ("ok", "error"):
        remarks.append(f"the run ended with status {execution.status.value}")
    if execution.stdout_truncated or execution.stderr_truncated:
        remarks.append("its output was cut at the server's limit")
    if remarks:
        print(f"noxctl: {'; '.join(remarks)}", file=sys.stderr, flush=True)


def run_py(
    ctx: typer.Context,
    *,
    file: Annotated[
        str | None,
        typer.Argument(
            metavar="FILE",
            show_default=False,
            help="The local Python file to run; - reads the code from stdin.",
        ),
    ] = None,
    code: Annotated[
        str | None,
        typer.Option("--code", "-c", metavar="CODE", help="The Python code to run, as text."),
    ] = None,
    stdin_file: StdinFileOpt = None,
    env: EnvOpt = None,
    timeout: RunTimeoutOpt = None,
    memory: MemoryOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Run Python code in a sandbox of the token's workspace (runner role).

    The code comes from FILE, from -c CODE, or from stdin with -. The program's stdout and
    stderr are printed to the matching streams unchanged, and noxctl exits with its exit code:
    124 when it hit the time limit, 137 the memory limit. --json prints the Execution instead.
    """
    if file is not None and code is not None:
        raise typer.BadParameter("give FILE or -c CODE, not both", param_hint="'--code'")
    if file is None and code is None:
        raise typer.BadParameter("give a FILE, -c CODE, or - to read stdin", param_hint="FILE")
    source = code if code is not None else _read_text(str(file), "FILE")
    _run(
        session_of(ctx), python=True, source=source, source_from_stdin=file == _STDIN,
        stdin_file=stdin_file, env=env, timeout=timeout, memory=memory,
    )  # fmt: skip


def run_sh(
    ctx: typer.Context,
    *,
    command: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="COMMAND",
            show_default=False,
            help="The command line, run by /bin/sh -c (words are joined with spaces, as ssh "
            "does; put -- before a command whose words start with -); - reads it from stdin.",
        ),
    ] = None,
    stdin_file: StdinFileOpt = None,
    env: EnvOpt = None,
    timeout: RunTimeoutOpt = None,
    memory: MemoryOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Run a shell command in a sandbox of the token's workspace (runner role).

    Output and exit code as run-py: stdout and stderr unchanged, the command's exit code (124
    on the time limit, 137 on the memory limit). --json prints the Execution instead.
    """
    if not command:
        raise typer.BadParameter("give a COMMAND, or - to read it from stdin", param_hint="COMMAND")
    from_stdin = command == [_STDIN]
    source = _read_text(_STDIN, "COMMAND") if from_stdin else " ".join(command)
    _run(
        session_of(ctx), python=False, source=source, source_from_stdin=from_stdin,
        stdin_file=stdin_file, env=env, timeout=timeout, memory=memory,
    )  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add the run commands to ``app``."""
    app.command("run-py", rich_help_panel=PANEL)(run_py)
    app.command("run-sh", rich_help_panel=PANEL)(run_sh)
