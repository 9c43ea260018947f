"""Administration (admin role): ``token``, ``audit``, ``policy``, ``backup``, ``backups`` and
``restore``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.json import JSON

from noxsdk import TokenRole
from noxsdk.cli._exits import EXIT_FAILURE, EXIT_USAGE, Failure, Refused
from noxsdk.cli._render import (
    emit_json,
    kv_table,
    note,
    print_table,
    show,
    size,
    table,
    waiting,
    when,
)
from noxsdk.cli._session import JsonOpt, WorkspaceOpt, session_of

__all__ = ["register"]

PANEL = "Administration"

token_app = typer.Typer(
    help="Create, list and revoke API tokens (admin role).", no_args_is_help=True
)
audit_app = typer.Typer(
    help="Show the audit log, newest first; 'audit verify' checks its MAC chain (admin role).",
    invoke_without_command=True,
)
policy_app = typer.Typer(
    help="Show the policy in force; 'policy reload' loads the policy file again (admin role).",
    invoke_without_command=True,
)


# -- tokens --


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    *,
    name: Annotated[
        str,
        typer.Option("--name", metavar="NAME", help="Who or what uses the token, e.g. ci-deploy."),
    ],
    role: Annotated[TokenRole, typer.Option("--role", help="What the token may do.")] = (
        TokenRole.RUNNER
    ),
    workspace: Annotated[
        str | None,
        typer.Option("--workspace", "-w", metavar="NAME", help="Its workspace (default: default)."),
    ] = None,
    expires_in_days: Annotated[
        int | None,
        typer.Option(
            "--expires-in-days",
            metavar="DAYS",
            min=1,
            help="Days until it expires (default: never).",
        ),
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Create a token and print its secret on stdout: it is shown this once only.

    The rest (id, role, workspace) goes to stderr, so TOKEN=$(noxctl token create ...) keeps
    just the secret. --json prints the whole answer, secret included.
    """
    session = session_of(ctx)
    with session.client() as client:
        made = client.create_token(name, role, workspace=workspace, expires_in_days=expires_in_days)
    if session.json:
        emit_json(made)
        return
    print(made.token, flush=True)
    expiry = f", expires {when(made.expires_at)} UTC" if made.expires_at else ""
    note(
        session,
        f"created token {made.id} {made.name!r} ({made.role.value}, workspace "
        f"{made.workspace}{expiry}); its secret above is shown this once",
    )


@token_app.command("list")
def token_list(
    ctx: typer.Context, workspace: WorkspaceOpt = None, json_output: JsonOpt = False
) -> None:
    """List the tokens, newest first, without their secrets."""
    session = session_of(ctx)
    with session.client() as client:
        tokens = client.list_tokens(workspace=workspace)
    if session.json:
        emit_json(tokens)
        return
    rows = (
        (t.id, t.name, t.role.value, t.workspace, when(t.created_at), when(t.expires_at),
         "active" if t.active else "revoked" if t.revoked_at else "expired")
        for t in tokens.items
    )  # fmt: skip
    grid = table("id", "name", "role", "workspace", "created", "expires", "state")
    print_table(grid, rows, empty="(no tokens)")


@token_app.command("revoke")
def token_revoke(
    ctx: typer.Context,
    *,
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id (token list).")],
    json_output: JsonOpt = False,
) -> None:
    """Revoke a token: it stops working at once. --json prints {"revoked": ID}."""
    session = session_of(ctx)
    with session.client() as client:
        client.revoke_token(token_id)
    if session.json:
        emit_json({"revoked": token_id})
    else:
        print(f"revoked {token_id}", flush=True)


# -- audit --


@audit_app.callback()
def audit(
    ctx: typer.Context,
    *,
    limit: Annotated[
        int | None,
        typer.Option("--limit", "-n", metavar="N", min=1, help="At most N entries (default 100)."),
    ] = None,
    action: Annotated[
        str | None,
        typer.Option("--action", metavar="ACTION", help="Only this action, e.g. token.create."),
    ] = None,
    actor: Annotated[
        str | None, typer.Option("--actor", metavar="NAME", help="Only this actor's entries.")
    ] = None,
    workspace: WorkspaceOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show the audit log, newest first, or check it with 'audit verify' (admin role)."""
    if ctx.invoked_subcommand is not None:
        return
    session = session_of(ctx)
    with session.client() as client:
        entries = client.audit(limit=limit, action=action, actor=actor, workspace=workspace)
    if session.json:
        emit_json(entries)
        return
    rows = (
        (e.seq, when(e.time), e.action, e.outcome, e.actor_name, e.workspace, e.target)
        for e in entries.items
    )
    grid = table("seq>", "time", "action", "outcome", "actor", "workspace", "target")
    print_table(grid, rows, empty="(no entries)")


@audit_app.command("verify")
def audit_verify(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """Check the audit log's MAC chain: exits 0 when it is intact, 1 when a line was edited,
    removed or reordered (the first bad line is named)."""
    session = session_of(ctx)
    with session.client() as client:
        verdict = client.verify_audit()
    if session.json:
        emit_json(verdict)
    elif verdict.ok:
        print(f"intact: {verdict.entries} entries", flush=True)
    else:
        print(
            f"TAMPERED: line {verdict.first_bad_line}: {verdict.reason} "
            f"({verdict.entries} entries checked)",
            flush=True,
        )
    if not verdict.ok:
        raise typer.Exit(EXIT_FAILURE)


# -- policy --


@policy_app.callback()
def policy(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """Show the policy in force as JSON, or load the file again with 'policy reload'."""
    if ctx.invoked_subcommand is not None:
        return
    session = session_of(ctx)
    with session.client() as client:
        document = client.policy()
    if session.json:
        emit_json(document)
    else:
        show(JSON.from_data(document))


@policy_app.command("reload")
def policy_reload(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """Load the policy file again and print the new policy; a bad file is refused (exit 2)
    with the reason, and the policy in force stays."""
    session = session_of(ctx)
    with session.client() as client:
        document = client.reload_policy()
    if session.json:
        emit_json(document)
    else:
        note(session, "the policy was reloaded")
        show(JSON.from_data(document))


# -- backups --


def backup(
    ctx: typer.Context,
    *,
    name: Annotated[
        str,
        typer.Argument(
            metavar="NAME", help="The backup's name: letters, digits, '.', '_' and '-'."
        ),
    ],
    json_output: JsonOpt = False,
) -> None:
    """Back up the server's data folder into an encrypted backup NAME (admin role).

    A spinner with the time elapsed shows on a terminal while the server works.
    """
    session = session_of(ctx)
    with session.client() as client, waiting(session, f"backing up as {name}"):
        made = client.create_backup(name)
    if session.json:
        emit_json(made)
        return
    kv_table([("backup", made.name), ("size", size(made.size)),
              ("created", f"{when(made.created_at)} UTC"), ("sha256", made.sha256)])  # fmt: skip


def backups(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """List the server's backups, newest first (admin role)."""
    session = session_of(ctx)
    with session.client() as client:
        found = client.list_backups()
    if session.json:
        emit_json(found)
        return
    rows = ((b.name, size(b.size), when(b.created_at), b.sha256) for b in found.items)
    print_table(table("name", "size>", "created", "sha256"), rows, empty="(no backups)")


def restore(
    ctx: typer.Context,
    *,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The backup to restore.")],
    yes: Annotated[
        bool,
        typer.Option("--yes", "-y", help="Do not ask; needed when stdin is not a terminal."),
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Replace the server's data with backup NAME (admin role).

    The server first backs up the present state (its name is printed). Asks for confirmation
    on a terminal unless --yes is given.
    """
    session = session_of(ctx)
    if not yes:
        if not sys.stdin.isatty():
            raise Refused(
                Failure("usage", "restore replaces the server's data", EXIT_USAGE,
                        hint="pass --yes to confirm it")
            )  # fmt: skip
        typer.confirm(f"Replace the server's data with backup {name!r}?", abort=True, err=True)
    with session.client() as client, waiting(session, f"restoring {name}"):
        done = client.restore_backup(name)
    if session.json:
        emit_json(done)
        return
    counts = done.restored
    kv_table(
        [("restored", name), ("workspaces", counts.workspaces),
         ("files", f"{counts.files} ({size(counts.bytes)})"), ("runs", counts.executions),
         ("tokens", counts.tokens), ("audit entries", counts.audit_entries),
         ("before it", f"backup {done.pre_restore}")]
    )  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add the administration commands to ``app``."""
    app.add_typer(token_app, name="token", rich_help_panel=PANEL)
    app.add_typer(audit_app, name="audit", rich_help_panel=PANEL)
    app.add_typer(policy_app, name="policy", rich_help_panel=PANEL)
    app.command("backup", rich_help_panel=PANEL)(backup)
    app.command("backups", rich_help_panel=PANEL)(backups)
    app.command("restore", rich_help_panel=PANEL)(restore)
