"""The ``noxctl`` command: its global options, its commands, and how a failure ends it.

Every way in (the console script, ``python -m noxsdk.cli``, typer's ``CliRunner``) goes through
:meth:`_Noxctl.main`, which turns any failure into one line on stderr (one JSON document with
``--json``) and an exit code from :mod:`noxsdk.cli._exits`: never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from noxsdk import NoxError, __version__
from noxsdk.cli import _admin, _files, _ops, _runs
from noxsdk.cli._exits import EXIT_FAILURE, EXIT_INTERRUPTED, Failure, Refused
from noxsdk.cli._session import JsonOpt, Session, session_of

__all__ = ["app", "main"]


def _json_in(argv: Sequence[str]) -> bool:
    """Whether ``--json`` was asked for, when parsing stopped before its option was read."""
    words = list(argv)
    return "--json" in (words[: words.index("--")] if "--" in words else words)


def _failure(exc: BaseException) -> Failure | int:  # noqa: PLR0911 - one return per kind
    """The failure ``exc`` means, or the bare exit code when there is nothing to say."""
    if isinstance(exc, NoxError):
        return Failure.of(exc)
    if isinstance(exc, Refused):
        return exc.failure
    format_message, exit_code = getattr(exc, "format_message", None), getattr(exc, "exit_code", 0)
    if callable(format_message) and isinstance(exit_code, int):  # the parser's usage errors
        message = str(format_message())
        if not message:  # the help was shown already (a group called without a command)
            return exit_code
        command = getattr(getattr(exc, "ctx", None), "command_path", "noxctl")
        return Failure("usage", message, exit_code, hint=f"see '{command} --help'")
    if isinstance(exc, typer.Abort):
        if isinstance(exc.__cause__, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        return Failure("aborted", "aborted", EXIT_FAILURE)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return Failure("os_error", f"{exc.strerror or exc}{where}", EXIT_FAILURE)
    return Failure(
        "internal",
        f"unexpected {type(exc).__name__}: {exc}",
        EXIT_FAILURE,
        hint="this is a bug in noxctl; please report it with the command line",
    )


class _Noxctl(TyperGroup):
    """The root command: parses and runs a command line, then ends it with an exit code."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        session = Session()
        extra.setdefault("obj", session)
        try:
            result = super().main(
                argv, prog_name, complete_var, False, windows_expand_args, **extra
            )
            code = result if isinstance(result, int) else 0
        except (Exception, KeyboardInterrupt) as exc:
            outcome = _failure(exc)
            if isinstance(outcome, int):
                code = outcome
            else:
                code = outcome.show(as_json=session.json or _json_in(argv))
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_Noxctl,
    name="noxctl",
    help="Talk to a Nox server: run code in its sandboxes, manage files, runs, tokens, the "
    "audit log, the policy and backups.\n\nThe global options below go before the command; "
    "--json may also come after it. NOX_URL and NOX_API_TOKEN configure the server and token.",
    epilog="Exit codes: 0 success, 1 server or connection error, 2 usage, 3 auth, 4 not "
    "found, 5 limits, 130 Ctrl-C; run-py and run-sh exit with the program's code.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        print(f"noxctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    *,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            metavar="URL",
            envvar="NOX_URL",
            help="The server (default: http://127.0.0.1:8080).",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            metavar="TOKEN",
            envvar="NOX_API_TOKEN",
            help="The API token (prefer the environment: options show in the process list).",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            min=0.001,
            help="How long to wait for the server's data (default 60; a run waits for its "
            "own time limit plus 30 s).",
        ),
    ] = None,
    retries: Annotated[
        int | None,
        typer.Option(
            "--retries",
            metavar="N",
            min=0,
            help="Further attempts of a call that is safe to repeat, when the server is "
            "unreachable or busy (default 3).",
        ),
    ] = None,
    json_output: JsonOpt = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_version, help="Print noxctl's version and exit."
        ),
    ] = False,
) -> None:
    """The global options, kept for the command that runs (see :class:`Session`)."""
    session = session_of(ctx)
    session.url, session.token, session.timeout, session.retries = url, token, timeout, retries


for _module in (_runs, _files, _ops, _admin):
    _module.register(app)


def main() -> None:
    """The ``noxctl`` console script."""
    app()
