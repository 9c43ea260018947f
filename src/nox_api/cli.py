"""``nox-api``: start the server and manage the local data folder without a running server.

Exit codes: 0 success, 1 a failure at run time, 2 bad configuration or usage (see
:mod:`nox_api.errors`).
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from nox_api.config import Settings, load_settings
from nox_api.errors import NoxError

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


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except NoxError as exc:
        typer.echo(f"nox-api: configuration error: {exc.message}", err=True)
        raise typer.Exit(2) from None


def _fail(exc: NoxError) -> typer.Exit:
    typer.echo(f"nox-api: {exc.message}", err=True)
    return typer.Exit(exc.exit_code)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (NOX_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (NOX_PORT).")] = None,
) -> None:
    """Start the HTTP server. On first start, creates an admin token and prints it once."""
    import uvicorn

    from nox_api.app import create_app
    from nox_api.services.tokens import Role, TokenService
    from nox_api.storage.db import Database

    settings = _settings(host=host, port=port)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings.data_path.mkdir(parents=True, exist_ok=True)
        db = Database(settings.sqlalchemy_url)
        db.migrate()
        tokens = TokenService(db)
        if settings.api_token is None and tokens.count() == 0:
            issued = tokens.create("admin", Role.ADMIN)
            typer.echo(
                "\n  Nox created the first admin token. It is shown this once; keep it safe:\n\n"
                f"    {issued.secret}\n\n"
                "  Use it as:  curl -H 'Authorization: Bearer <token>' ...\n"
            )
        db.close()
    except NoxError as exc:
        raise _fail(exc) from None
    except OSError as exc:
        typer.echo(f"nox-api: cannot prepare the data folder {settings.data_path}: {exc}", err=True)
        raise typer.Exit(1) from None
    sys.stdout.flush()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        proxy_headers=False,
    )


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
    from nox_api.storage.db import Database

    try:
        parsed_role = Role(role)
    except ValueError:
        typer.echo(f"nox-api: --role must be one of viewer, runner, admin (got {role!r})", err=True)
        raise typer.Exit(2) from None
    settings = _settings()
    try:
        settings.data_path.mkdir(parents=True, exist_ok=True)
        db = Database(settings.sqlalchemy_url)
        db.migrate()
        issued = TokenService(db).create(name, parsed_role, workspace, expires_in_days)
        db.close()
    except NoxError as exc:
        raise _fail(exc) from None
    typer.echo(issued.secret)


def main() -> None:
    app()
