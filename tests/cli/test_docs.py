"""docs/cli.md is what ``scripts/gen_cli_docs.py`` writes from the commands' own help, and that
help is complete: every command and every argument and option says what it is for."""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from noxsdk.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts/gen_cli_docs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(group: Any, ctx: Any) -> Iterator[tuple[Any, Any]]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        sub = command.make_context(name, [], parent=ctx, resilient_parsing=True)
        yield command, sub
        if hasattr(command, "list_commands"):
            yield from _commands(command, sub)


def _all() -> list[tuple[Any, Any]]:
    root = typer.main.get_command(app)
    ctx = root.make_context("noxctl", [], resilient_parsing=True)
    return [(root, ctx), *_commands(root, ctx)]


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0]


def test_the_cli_reference_is_up_to_date() -> None:
    generator = _generator()
    current = (ROOT / "docs/cli.md").read_text(encoding="utf-8")
    wanted = generator.update(current)
    diff = "".join(
        difflib.unified_diff(
            current.splitlines(keepends=True), wanted.splitlines(keepends=True), "docs/cli.md",
            "generated",
        )
    )  # fmt: skip
    assert not diff, f"docs/cli.md is stale: run python scripts/gen_cli_docs.py\n{diff}"
    assert generator.main(["--check"]) == 0


def test_the_reference_names_every_command_and_option() -> None:
    reference = _generator().render()
    assert "### `noxctl` (global options)" in reference
    for command, ctx in _all():
        if ctx.parent is not None:
            assert f"### `{ctx.command_path}`" in reference
        for param in command.get_params(ctx):
            for flag in getattr(param, "opts", []):
                if flag.startswith("--"):
                    assert flag in reference, (ctx.command_path, flag)


def test_the_issue_commands_all_exist() -> None:
    paths = {ctx.command_path for _, ctx in _all()}
    wanted = [
        "health",
        "put",
        "run-py",
        "run-sh",
        "ls",
        "cat",
        "rm",
        "search",
        "history",
        "logs",
        "status",
        "sandbox-clean",
        "backup",
        "restore",
        "backups",
        "token",
        "audit",
        "policy",
        "whoami",
    ]
    assert {f"noxctl {name}" for name in wanted} <= paths
    subcommands = {"token create", "token list", "token revoke", "audit verify", "policy reload"}
    assert {f"noxctl {name}" for name in subcommands} <= paths


@pytest.mark.parametrize("path", [ctx.command_path for _, ctx in _all()])
def test_every_command_has_complete_help(path: str) -> None:
    command, ctx = next((c, x) for c, x in _all() if x.command_path == path)
    assert (command.help or "").strip(), f"{path} has no help"
    for param in command.get_params(ctx):
        assert (getattr(param, "help", None) or "").strip(), f"{path}: {param.name} has no help"
    shown = CliRunner().invoke(app, [*path.split()[1:], "--help"], env={"COLUMNS": "120"})
    assert shown.exit_code == 0, shown.output
    assert f"Usage: {path}" in shown.stdout
    assert " ".join(_first_line(command.help).split()[:4]) in " ".join(shown.stdout.split())


def test_json_is_accepted_by_every_command() -> None:
    for command, ctx in _all():
        flags = {flag for param in command.get_params(ctx) for flag in getattr(param, "opts", [])}
        if command.name == "token":  # a group of commands only: each of them takes --json
            continue
        assert "--json" in flags, ctx.command_path
