"""The workspace's files: ``put``, ``ls``, ``cat``, ``rm`` and ``search``."""

from __future__ import annotations

import base64
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from noxsdk import ConflictError
from noxsdk.cli._exits import Failure, Refused
from noxsdk.cli._render import (
    emit_json,
    note,
    print_table,
    size,
    table,
    transfer,
    when,
)
from noxsdk.cli._session import JsonOpt, WorkspaceOpt, session_of

__all__ = ["register"]

PANEL = "Files"
_STDIN = "-"


def put(
    ctx: typer.Context,
    *,
    source: Annotated[
        str,
        typer.Argument(metavar="SOURCE", help="The local file to upload; - uploads stdin."),
    ],
    dest: Annotated[
        str | None,
        typer.Argument(
            metavar="DEST",
            show_default=False,
            help="Its path in the workspace (default: the file's name; a path ending in / "
            "names a folder to put it in). Folders are created; a file there is replaced.",
        ),
    ] = None,
    workspace: WorkspaceOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Upload a local file to the workspace (runner role), with a progress bar on a terminal.

    Prints the stored file's path, size and SHA-256 (--json: its FileInfo).
    """
    session = session_of(ctx)
    if source == _STDIN:
        if not dest or dest.endswith("/"):
            raise typer.BadParameter("uploading stdin needs a DEST file path", param_hint="DEST")
        target = dest
    else:
        local = Path(source)
        if not local.is_file():
            raise typer.BadParameter(f"{source} is not a readable file", param_hint="SOURCE")
        target = local.name if not dest else dest + local.name if dest.endswith("/") else dest
    with session.client() as client, transfer(session, f"put {target}") as progress:
        if source == _STDIN:
            info = client.write_file(
                target, sys.stdin.buffer, workspace=workspace, progress=progress
            )
        else:
            info = client.write_file(target, local, workspace=workspace, progress=progress)
    if session.json:
        emit_json(info)
        return
    print(f"{info.path}  {size(info.size)}  sha256 {info.sha256}", flush=True)


def ls(
    ctx: typer.Context,
    *,
    path: Annotated[
        str,
        typer.Argument(metavar="PATH", help="The folder to list (default: the workspace)."),
    ] = "",
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="List the whole tree below PATH.")
    ] = False,
    workspace: WorkspaceOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List a folder of the workspace: type, size, time of the last change (UTC) and path."""
    session = session_of(ctx)
    with session.client() as client:
        listing = client.list_files(path, recursive=recursive, workspace=workspace)
    if session.json:
        emit_json(listing)
        return
    rows = (
        (e.type, size(e.size) if e.type == "file" else "-", when(e.modified),
         e.path + ("/" if e.type == "dir" else ""))
        for e in listing.entries
    )  # fmt: skip
    print_table(table("type", "size>", "modified", "path"), rows, empty="(no entries)")
    if listing.truncated:
        note(session, "the listing stopped at the server's limit; list a folder further down")


def cat(
    ctx: typer.Context,
    *,
    path: Annotated[str, typer.Argument(metavar="PATH", help="The file in the workspace.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Save it to this local file (or into this folder) instead of printing it; a "
            "progress bar shows on a terminal, and a failed download leaves no partial file.",
        ),
    ] = None,
    workspace: WorkspaceOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Print a file of the workspace on stdout, byte for byte, or save it with -o.

    --json prints {"path", "size", "encoding", "content"} (content as UTF-8 text, or base64
    when it is not text), or with -o {"path", "size", "saved_to"}.
    """
    session = session_of(ctx)
    with session.client() as client:
        if output is not None:
            target = output / Path(path).name if output.is_dir() else output
            with transfer(session, f"get {path}") as progress:
                count = client.download(path, target, workspace=workspace, progress=progress)
            if session.json:
                emit_json({"path": path, "size": count, "saved_to": str(target)})
            else:
                note(session, f"saved {path} to {target} ({size(count)})")
        elif session.json:
            data = client.read_file(path, workspace=workspace)
            try:
                content, encoding = data.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                content, encoding = base64.b64encode(data).decode("ascii"), "base64"
            emit_json({"path": path, "size": len(data), "encoding": encoding, "content": content})
        else:
            sys.stdout.flush()
            for chunk in client.iter_file(path, workspace=workspace):
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()


def rm(
    ctx: typer.Context,
    *,
    path: Annotated[str, typer.Argument(metavar="PATH", help="The file or folder to remove.")],
    recursive: Annotated[
        bool,
        typer.Option("--recursive", "-r", help="Remove a folder that is not empty, and all in it."),
    ] = False,
    workspace: WorkspaceOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Remove a file, a link or a folder of the workspace (runner role).

    --json prints {"deleted": PATH}.
    """
    session = session_of(ctx)
    with session.client() as client:
        try:
            client.delete_file(path, recursive=recursive, workspace=workspace)
        except ConflictError as exc:
            if recursive:
                raise
            failure = replace(Failure.of(exc), hint="add -r to remove the folder and all in it")
            raise Refused(failure) from None
    if session.json:
        emit_json({"deleted": path})
    else:
        print(f"removed {path}", flush=True)


def search(
    ctx: typer.Context,
    *,
    query: Annotated[
        str,
        typer.Argument(
            metavar="QUERY", help='The text to find, line by line ("" to find files by --glob).'
        ),
    ],
    glob: Annotated[
        str | None,
        typer.Option(
            "--glob",
            "-g",
            metavar="PATTERN",
            help="Only files whose name (or path, when it holds a /) matches this pattern.",
        ),
    ] = None,
    regex: Annotated[
        bool, typer.Option("--regex", "-E", help="QUERY is a regular expression (RE2 syntax).")
    ] = False,
    max_results: Annotated[
        int | None,
        typer.Option(
            "--max-results",
            "-m",
            metavar="N",
            min=1,
            help="Stop after N matches (default: the server's, 100).",
        ),
    ] = None,
    workspace: WorkspaceOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Search the workspace's files for lines that contain QUERY: path, line number, text."""
    session = session_of(ctx)
    with session.client() as client:
        found = client.search_files(
            query, glob=glob, regex=regex, max_results=max_results, workspace=workspace
        )
    if session.json:
        emit_json(found)
        return
    rows = ((m.path, m.line, m.text) for m in found.matches)
    print_table(table("path", "line>", "text"), rows, empty="(no matches)")
    if found.truncated:
        note(session, "the search stopped early (--max-results or the server's time or size cap)")


def register(app: typer.Typer) -> None:
    """Add the file commands to ``app``."""
    for name, command in (("put", put), ("ls", ls), ("cat", cat), ("rm", rm), ("search", search)):
        app.command(name, rich_help_panel=PANEL)(command)
