"""``noxctl``, the command line of the Nox SDK (needs the ``cli`` extra: typer and rich).

The SDK itself never imports this package. Commands are grouped by module: ``_runs`` (run-py,
run-sh), ``_files`` (put, ls, cat, rm, search), ``_ops`` (health, whoami, status, history,
logs, sandbox-clean) and ``_admin`` (token, audit, policy, backup, backups, restore); how
answers are shown is ``_render``, exit codes and error lines ``_exits``.
"""

from noxsdk.cli._app import app, main

__all__ = ["app", "main"]
