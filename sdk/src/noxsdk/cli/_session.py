"""What one ``noxctl`` invocation knows: the global options, the output mode, the client.

The :class:`Session` is the command line's context object (``ctx.obj``): the root command fills
it from ``--url``, ``--token``, ``--timeout``, ``--retries`` and ``--json``, and every command
may set ``--json`` again after its name. The option types shared by several commands live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

from noxsdk import ClientOptions, NoxClient

__all__ = ["JsonOpt", "Session", "WorkspaceOpt", "session_of"]


@dataclass
class Session:
    """The global options of one invocation (``None``: the SDK's default or environment)."""

    url: str | None = None
    token: str | None = None
    timeout: float | None = None
    retries: int | None = None
    json: bool = False

    def client(self) -> NoxClient:
        """A client of the server named by ``--url`` / ``NOX_URL`` (close it when done)."""
        options: ClientOptions = {}
        if self.timeout is not None:
            options["timeout"] = self.timeout
        if self.retries is not None:
            options["max_retries"] = self.retries
        return NoxClient(self.url, self.token, **options)


def session_of(ctx: typer.Context) -> Session:
    """The invocation's :class:`Session` (made on first use when no caller gave one)."""
    return ctx.ensure_object(Session)


def _json_flag(ctx: typer.Context, value: bool) -> bool:
    if value:
        session_of(ctx).json = True
    return value


JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        is_eager=True,
        callback=_json_flag,
        help="Print one JSON document on stdout (errors as JSON on stderr) instead of text.",
    ),
]
WorkspaceOpt = Annotated[
    str | None,
    typer.Option(
        "--workspace",
        "-w",
        metavar="NAME",
        help="Act on this workspace (admin tokens only; default: the token's own).",
    ),
]
