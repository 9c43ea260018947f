"""``nox-api``: start the server and manage the local data folder without a running server.

Exit codes: 0 success, 1 a failure at run time, 2 bad configuration or usage (see
:mod:`nox_api.errors`).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from nox_api.config import Settings, load_settings
from nox_api.errors import NoxError

if TYPE_CHECKING:
    from types import FrameType

    from nox_api.services.auditing import Caller
    from nox_api.services.backups import BackupService
    from nox_api.storage.db import Database

__all__ = ["app", "main"]

app = typer.Typer(
    name="nox-api",
    help="The Nox server: run untrusted code in sandboxes behind an HTTP API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
token_app = typer.Typer(help="Manage API tokens in the local database.", no_args_is_help=True)
app.add_typer(token_app, name="token")
audit_app = typer.Typer(help="Check the local audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
backup_app = typer.Typer(
    help="Create, list and restore encrypted backups of the local data folder.",
    no_args_is_help=True,
)
app.add_typer(backup_app, name="backup")


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except NoxError as exc:
        typer.echo(f"nox-api: configuration error: {exc.message}", err=True)
        raise typer.Exit(2) from None


def _fail(exc: NoxError) -> typer.Exit:
    typer.echo(f"nox-api: {exc.message}", err=True)
    return typer.Exit(exc.exit_code)


def _log_to_stderr() -> None:
    """Coloured, aligned lines on a terminal (structlog's console renderer); plain text lines
    otherwise (a service manager's journal). The JSON file log is set up by the server."""
    from nox_api.observability.logging import console_formatter

    handler = logging.StreamHandler()
    if sys.stderr.isatty():
        handler.setFormatter(console_formatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def _raise_open_files_limit() -> None:
    """Let the server use as many open files as its hard limit allows: a recursive listing or
    search holds a descriptor per folder level (up to 256) and a default soft limit of 1024
    could run out under a few at once. Sandboxes set their own limit (the policy's open_files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (NOX_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (NOX_PORT).")] = None,
) -> None:
    """Start the HTTP server. On first start, creates an admin token and prints it once."""
    import uvicorn

    from nox_api.app import create_app
    from nox_api.services.backups import refuse_interrupted_restore
    from nox_api.services.policy import load_policy
    from nox_api.services.tokens import Role, TokenService

    settings = _settings(host=host, port=port)
    _raise_open_files_limit()
    _log_to_stderr()
    try:
        load_policy(settings.policy_path)  # a bad policy file stops start-up here, exit 2
        refuse_interrupted_restore(settings.data_path)  # so does a restore cut off mid-swap
        with _local_database(settings) as db:
            tokens = TokenService(db)
            if settings.api_token is None and tokens.count() == 0:
                issued = tokens.create("admin", Role.ADMIN)
                typer.echo(
                    "\n  Nox created the first admin token. It is shown this once; keep it "
                    "safe:\n\n"
                    f"    {issued.secret}\n\n"
                    "  Use it as:  curl -H 'Authorization: Bearer <token>' ...\n"
                )
    except NoxError as exc:
        raise _fail(exc) from None
    except OSError as exc:
        typer.echo(f"nox-api: cannot prepare the data folder {settings.data_path}: {exc}", err=True)
        raise typer.Exit(1) from None
    sys.stdout.flush()
    application = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            # uvicorn waits for open responses before it shuts down: end the log streams.
            nox = getattr(application.state, "nox", None)
            if nox is not None:
                nox.logs.end_streams()

    # X-Forwarded-For is believed only from the proxies named in NOX_TRUSTED_PROXIES.
    trusted = list(settings.trusted_proxies)
    config = uvicorn.Config(
        application, host=settings.host, port=settings.port, log_level="info",
        proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None,
    )  # fmt: skip
    server = Server(config)
    server.run()
    if not server.started:
        raise typer.Exit(3)  # what uvicorn.run exits with when the server could not start


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="A name that says who or what uses the token.")],
    role: Annotated[str, typer.Option(help="viewer, runner or admin.")] = "runner",
    workspace: Annotated[str, typer.Option(help="The token's workspace.")] = "default",
    expires_in_days: Annotated[
        int | None, typer.Option(help="Days until it expires (default: never).")
    ] = None,
) -> None:
    """Create a token in the local database and print its secret (shown this once)."""
    from nox_api.services.tokens import Role, TokenService

    try:
        parsed_role = Role(role)
    except ValueError:
        typer.echo(f"nox-api: --role must be one of viewer, runner, admin (got {role!r})", err=True)
        raise typer.Exit(2) from None
    settings = _settings()
    try:
        with _local_database(settings) as db:
            issued = TokenService(db).create(name, parsed_role, workspace, expires_in_days)
            _audit_offline(
                settings, db, "token.create", workspace=workspace, target=issued.principal.id,
                name=name, role=parsed_role.value,
            )  # fmt: skip
    except NoxError as exc:
        raise _fail(exc) from None
    typer.echo(issued.secret)


@contextmanager
def _local_database(settings: Settings) -> Iterator[Database]:
    """The data folder's database, migrated, closed afterwards: what the offline commands use."""
    from nox_api.storage.db import Database

    settings.data_path.mkdir(parents=True, exist_ok=True)
    db = Database(settings.sqlalchemy_url)
    try:
        db.migrate()
        yield db
    finally:
        db.close()


def _audit_offline(settings: Settings, db: Database, action: str, **fields: Any) -> None:
    """Record a command-line action in the audit log (actor: the local user)."""
    import getpass

    from nox_api.services.auditing import Auditor, Caller, open_audit_log
    from nox_api.services.tokens import Principal, Role

    cli_user = Principal("cli", f"cli:{getpass.getuser()}", Role.ADMIN, "default")
    with open_audit_log(settings, db) as audit_log:
        Auditor(audit_log).record(action, Caller(cli_user, "local"), **fields)


@token_app.command("list")
def token_list(
    workspace: Annotated[str | None, typer.Option(help="Only this workspace's tokens.")] = None,
) -> None:
    """List the tokens of the local database (never their secrets)."""
    from nox_api.services.tokens import TokenService

    settings = _settings()
    try:
        with _local_database(settings) as db:
            items = TokenService(db).list(workspace)
    except NoxError as exc:
        raise _fail(exc) from None
    typer.echo(f"{'ID':<16}  {'NAME':<24}  {'ROLE':<6}  {'WORKSPACE':<16}  {'STATE':<8}  EXPIRES")
    for t in items:
        state = "revoked" if t.revoked_at else ("active" if t.active else "expired")
        expires = t.expires_at.strftime("%Y-%m-%d") if t.expires_at else "never"
        typer.echo(
            f"{t.id:<16}  {t.name[:24]:<24}  {t.role.value:<6}  {t.workspace[:16]:<16}  "
            f"{state:<8}  {expires}"
        )


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (see `nox-api token list`).")],
) -> None:
    """Revoke a token: a running server refuses it at its next request."""
    from nox_api.services.tokens import TokenService

    settings = _settings()
    try:
        with _local_database(settings) as db:
            info = TokenService(db).revoke(token_id)
            _audit_offline(settings, db, "token.revoke", workspace=info.workspace,
                           target=info.id, name=info.name)  # fmt: skip
    except NoxError as exc:
        raise _fail(exc) from None
    typer.echo(f"revoked {info.id} ({info.name})")


@audit_app.command("verify")
def audit_verify(
    file: Annotated[
        Path | None,
        typer.Argument(help="One audit file to check alone (default: the whole chain)."),
    ] = None,
) -> None:
    """Check the audit log's MAC chain (and, for the whole log, its checkpoint). Exit 0 when
    intact, 1 when tampered."""
    from nox_api.services.audit import CURRENT_FILE, verify_files
    from nox_api.services.auditing import DatabaseCheckpointStore, audit_key, open_audit_log

    settings = _settings()
    if file is not None and not file.is_file():
        typer.echo(f"nox-api: {file} is not a file", err=True)
        raise typer.Exit(2)
    try:
        with _local_database(settings) as db:
            if file is None:
                with open_audit_log(settings, db) as audit_log:
                    report = audit_log.verify()
            else:
                checkpoint = None
                if file.resolve() == (settings.audit_dir / CURRENT_FILE).resolve():
                    checkpoint = DatabaseCheckpointStore(db).load()
                # One file alone: its first line continues a chain that starts in an older one.
                report = verify_files([file], audit_key(settings), checkpoint, partial=True)
    except NoxError as exc:
        raise _fail(exc) from None
    except ValueError as exc:
        typer.echo(f"nox-api: {exc}", err=True)
        raise typer.Exit(2) from None
    if report.ok:
        typer.echo(f"audit log intact: {report.entries} entries")
        return
    where = f" ({report.file})" if report.file else ""
    typer.echo(f"audit log TAMPERED at line {report.first_bad_line}{where}: {report.reason}")
    typer.echo(f"{report.entries} entries verified before it")
    raise typer.Exit(1)


# -- backup ----------------------------------------------------------------------------------


class _MiBProgress:
    """MiB done, on stderr: one line updated twice a second on a terminal, else a line every
    10 seconds (cron mail stays short). Nothing for work done within the first interval."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._tty = sys.stderr.isatty()
        self._every_s = 0.5 if self._tty else 10.0
        self._done = 0
        self._shown = time.monotonic()
        self._printed = False

    def __call__(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._shown >= self._every_s:
            self._shown = now
            self._printed = True
            line = f"nox-api: {self._what}: {self._done / (1 << 20):,.0f} MiB"
            typer.echo(f"\r{line}" if self._tty else line, err=True, nl=not self._tty)

    def end(self) -> None:
        if self._printed and self._tty:
            typer.echo("", err=True)


def _local_caller() -> Caller:
    import getpass

    from nox_api.services.auditing import Caller
    from nox_api.services.tokens import Principal, Role

    return Caller(Principal("cli", f"cli:{getpass.getuser()}", Role.ADMIN, "default"), "local")


@contextmanager
def _backup_service(settings: Settings) -> Iterator[BackupService]:
    from nox_api.services.auditing import Auditor, open_audit_log
    from nox_api.services.backups import BackupService, sqlite_path, workspace_owner

    sqlite_path(settings)  # before opening anything: only SQLite for now
    with _local_database(settings) as db, open_audit_log(settings, db) as audit_log:
        yield BackupService(settings, db, Auditor(audit_log), owner=workspace_owner(settings))


@backup_app.command("create")
def backup_create(
    name: Annotated[str, typer.Argument(help="The backup's name: NAME.noxbak in data/backups.")],
) -> None:
    """Write an encrypted backup of the local data folder (key: NOX_BACKUP_KEY or
    NOX_BACKUP_PASSPHRASE). Safe while a server runs on it."""
    settings = _settings()
    progress = _MiBProgress(f"backing up into {name}")
    try:
        with _backup_service(settings) as service:
            info = service.create(name, _local_caller(), progress)
            path = service.path_of(name)
    except NoxError as exc:
        raise _fail(exc) from None
    finally:
        progress.end()
    typer.echo(f"created {path} ({info.size} bytes, sha256 {info.sha256})")


@backup_app.command("list")
def backup_list() -> None:
    """List the backups of the local data folder, newest first."""
    settings = _settings()
    try:
        with _backup_service(settings) as service:
            items = service.list_all()
    except NoxError as exc:
        raise _fail(exc) from None
    typer.echo(f"{'NAME':<40}  {'SIZE':>14}  {'CREATED':<20}  SHA256")
    for item in items:
        created = item.created_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        typer.echo(f"{item.name:<40}  {item.size:>14}  {created:<20}  {item.sha256}")


@backup_app.command("restore")
def backup_restore(
    name: Annotated[str, typer.Argument(help="The backup to restore (see `backup list`).")],
) -> None:
    """Restore a backup into the local data folder; refused while a server runs on it (use the
    API then). The present state is kept first as the backup pre-restore-<time>."""
    from nox_api.services.backups import validate_backup_name
    from nox_api.services.server_lock import ServerLock

    settings = _settings()
    progress = _MiBProgress(f"restoring {name}")
    try:
        validate_backup_name(name)
        with ServerLock.exclusive(settings.data_path, name), _backup_service(settings) as service:
            result = service.restore(name, _local_caller(), progress)
    except NoxError as exc:
        raise _fail(exc) from None
    finally:
        progress.end()
    counts = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in result.counts.items())
    typer.echo(f"restored {name}: {counts}")
    typer.echo(f"the state before it is in the backup {result.pre_restore}")


def main() -> None:
    app()
