"""The server and its runs: ``health``, ``whoami``, ``status``, ``history``, ``logs`` and
``sandbox-clean``."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from noxsdk import ExecutionKind, ExecutionStatus, HealthReport, HealthStatus
from noxsdk.cli._exits import EXIT_FAILURE
from noxsdk.cli._render import (
    emit_json,
    kv_table,
    note,
    print_table,
    size,
    table,
    when,
    write_exact,
)
from noxsdk.cli._session import JsonOpt, WorkspaceOpt, session_of

__all__ = ["register"]

PANEL = "Server and runs"


def _checks_table(report: HealthReport) -> None:
    checks = report.checks
    parts = {
        "database": checks.database,
        "sandbox": checks.sandbox,
        "disk": checks.disk,
        "audit": checks.audit,
        "policy": checks.policy,
    }
    rows = ((name, check.status.value, check.detail) for name, check in parts.items())
    print_table(table("check", "status", "detail", title=f"health: {report.status.value}"),
                rows, empty="(no checks)")  # fmt: skip


def health(
    ctx: typer.Context,
    *,
    detailed: Annotated[
        bool,
        typer.Option(
            "--detailed",
            "-d",
            help="Each part's health (database, sandbox, disk, audit, policy; needs a token); "
            "exits 1 when the server reports fail.",
        ),
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Check that the server answers, and its version (no token needed)."""
    session = session_of(ctx)
    with session.client() as client:
        if not detailed:
            answer = client.health()
            if session.json:
                emit_json(answer)
            else:
                print(f"{answer.status}: Nox {answer.version} at {client.url}", flush=True)
            return
        report = client.health_detailed()
    if session.json:
        emit_json(report)
    else:
        _checks_table(report)
    if report.status is HealthStatus.FAIL:
        raise typer.Exit(EXIT_FAILURE)


def whoami(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """Show who the token is: its name, role, workspace and id."""
    session = session_of(ctx)
    with session.client() as client:
        me = client.me()
        url = client.url
    if session.json:
        emit_json(me)
        return
    kv_table([("name", me.name), ("role", me.role.value), ("workspace", me.workspace),
              ("token id", me.id), ("server", url)])  # fmt: skip


def status(
    ctx: typer.Context,
    *,
    full: Annotated[
        bool,
        typer.Option("--full", help="Also the machine's resources and each part's health."),
    ] = False,
    workspace: WorkspaceOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show the server's statistics: runs by status and kind, durations, files, uptime.

    --json prints {"stats": SystemStats}, with --full also "resources" and "health".
    """
    session = session_of(ctx)
    with session.client() as client:
        stats = client.stats(workspace=workspace)
        resources = client.resources() if full else None
        report = client.health_detailed() if full else None
    if session.json:
        document: dict[str, Any] = {"stats": stats.model_dump(mode="json")}
        if resources is not None and report is not None:
            document["resources"] = resources.model_dump(mode="json")
            document["health"] = report.model_dump(mode="json")
        emit_json(document)
        return
    runs = stats.executions
    mean = "-" if runs.mean_duration_ms is None else f"{runs.mean_duration_ms:.1f} ms"
    p95 = "-" if runs.p95_duration_ms is None else f"{runs.p95_duration_ms:.1f} ms"
    by_status = ", ".join(f"{k} {v}" for k, v in runs.by_status.items() if v) or "-"
    by_kind = ", ".join(f"{k} {v}" for k, v in runs.by_kind.items() if v) or "-"
    kv_table(
        [
            ("server", f"Nox {stats.version}, up {stats.uptime_s:.0f} s"),
            ("sandbox", f"{stats.sandbox.name} (isolation {stats.sandbox.isolation}, "
                        f"{'available' if stats.sandbox.available else 'UNAVAILABLE'})"),
            ("workspace", stats.workspace or "all"),
            ("runs", f"{runs.total} ({runs.last_24h} in the last 24 h)"),
            ("by status", by_status),
            ("by kind", by_kind),
            ("duration", f"mean {mean}, p95 {p95}"),
            ("files", f"{stats.files.count} files, {size(stats.files.bytes)}"),
        ]
    )  # fmt: skip
    if resources is not None and report is not None:
        mem, disk = resources.memory, resources.disk
        load = " ".join(f"{value:.2f}" for value in resources.load_average)
        kv_table(
            [
                ("cpu", f"{resources.cpu_percent:.1f} % of {resources.cpu_count} CPUs, "
                        f"load {load}"),
                ("memory", f"{mem.used_percent:.1f} % used, {size(mem.available_bytes)} free "
                           f"of {size(mem.total_bytes)}"),
                ("disk", f"{disk.used_percent:.1f} % used, {size(disk.free_bytes)} free of "
                         f"{size(disk.total_bytes)}"),
            ],
            title="resources",
        )  # fmt: skip
        _checks_table(report)


def history(
    ctx: typer.Context,
    *,
    run_id: Annotated[
        str | None,
        typer.Argument(
            metavar="ID", show_default=False, help="Show this run whole: its code and output."
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", "-n", metavar="N", min=1, help="Runs per page (default 20)."),
    ] = None,
    offset: Annotated[
        int | None, typer.Option("--offset", metavar="N", min=0, help="Skip the newest N runs.")
    ] = None,
    kind: Annotated[
        ExecutionKind | None, typer.Option("--kind", help="Only runs of this kind.")
    ] = None,
    run_status: Annotated[
        ExecutionStatus | None, typer.Option("--status", help="Only runs that ended so.")
    ] = None,
    workspace: WorkspaceOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List past runs, newest first, or show one run with its code and output."""
    session = session_of(ctx)
    with session.client() as client:
        if run_id is not None:
            detail = client.execution(run_id)
        else:
            page = client.history(
                limit=limit, offset=offset, kind=kind, status=run_status, workspace=workspace
            )
    if run_id is not None:
        if session.json:
            emit_json(detail)
            return
        kv_table(
            [("id", detail.id), ("kind", detail.kind.value), ("status", detail.status.value),
             ("exit code", detail.exit_code), ("started", when(detail.started_at)),
             ("duration", f"{detail.duration_ms:.1f} ms"), ("actor", detail.actor),
             ("workspace", detail.workspace)]
        )  # fmt: skip
        for title, text in (("code", detail.code), ("stdout", detail.stdout),
                            ("stderr", detail.stderr)):  # fmt: skip
            print(f"── {title} ──", flush=True)
            write_exact(sys.stdout, text if not text or text.endswith("\n") else text + "\n")
        return
    if session.json:
        emit_json(page)
        return
    rows = (
        (item.id, when(item.started_at), item.kind.value, item.status.value, item.exit_code,
         f"{item.duration_ms:.1f}", item.actor)
        for item in page.items
    )  # fmt: skip
    grid = table("id", "started", "kind", "status", "exit>", "ms>", "actor")
    print_table(grid, rows, empty="(no runs)")
    shown = (offset or 0) + len(page.items)
    if shown < page.total:
        note(session, f"{shown} of {page.total} runs shown; --offset {shown} shows more")


def _log_text(line: str) -> str:
    """A server log line (a JSON object) as ``time level logger: message key=value``."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    head = [str(record.pop(key, "")) for key in ("time", "level", "logger")]
    message = str(record.pop("message", None) or record.pop("event", ""))
    trace = record.pop("exc_info", None)
    rest = " ".join(f"{key}={value}" for key, value in record.items())
    text = f"{' '.join(h for h in head if h)}: {message}" + (f" {rest}" if rest else "")
    return text + (f"\n{trace}" if trace else "")


def logs(
    ctx: typer.Context,
    *,
    tail: Annotated[
        int | None,
        typer.Option(
            "--tail",
            "-n",
            metavar="N",
            min=1,
            help="The last N lines (default: the server's, 100).",
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Then print new lines as the server writes them, until Ctrl-C."
        ),
    ] = False,
    duration: Annotated[
        float | None,
        typer.Option(
            "--duration",
            metavar="SECONDS",
            min=0.1,
            help="With --follow: stop after this many seconds.",
        ),
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Print the server's recent log lines (admin role), as text or raw JSON lines.

    --json prints {"lines": [...]}; with --follow each line is printed as it comes, one JSON
    object per line (JSON Lines).
    """
    session = session_of(ctx)
    with session.client() as client:
        lines = client.logs(tail).lines
        if session.json and not follow:
            emit_json({"lines": lines})
            return
        for line in lines:
            print(line if session.json else _log_text(line), flush=True)
        if follow:
            for line in client.stream_logs(duration_s=duration):
                print(line if session.json else _log_text(line), flush=True)


def sandbox_clean(
    ctx: typer.Context,
    *,
    older_than: Annotated[
        int | None,
        typer.Option(
            "--older-than",
            metavar="DAYS",
            min=0,
            help="Also remove workspace files not changed for DAYS days (0: all of them).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be removed.")
    ] = False,
    workspace: Annotated[
        str | None,
        typer.Option("--workspace", "-w", metavar="NAME", help="Only this workspace."),
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Remove leftover temporary files of sandboxes (admin role).

    With --older-than, also workspace files not changed for that many days. Prints how many
    entries were removed and the bytes freed; --dry-run lists them and changes nothing.
    """
    session = session_of(ctx)
    with session.client() as client:
        cleaned = client.clean(older_than_days=older_than, workspace=workspace, dry_run=dry_run)
    if session.json:
        emit_json(cleaned)
        return
    verb = "would remove" if cleaned.dry_run else "removed"
    print(f"{verb} {cleaned.removed} entries, {size(cleaned.freed_bytes)}", flush=True)
    if cleaned.dry_run:
        for path in cleaned.paths:
            print(f"  {path}")
        if cleaned.paths_truncated:
            note(session, "only the first paths are listed")


def register(app: typer.Typer) -> None:
    """Add the server and run commands to ``app``."""
    for name, command in (
        ("health", health),
        ("whoami", whoami),
        ("status", status),
        ("history", history),
        ("logs", logs),
        ("sandbox-clean", sandbox_clean),
    ):
        app.command(name, rich_help_panel=PANEL)(command)
