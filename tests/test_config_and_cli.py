"""Settings validation and the nox-api command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import serve_refused
from typer.testing import CliRunner

from nox_api.cli import app as cli_app
from nox_api.config import Settings, load_settings
from nox_api.errors import ConfigError
from nox_api.services.tokens import Role, TokenService
from nox_api.storage.db import Database

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_safe() -> None:
    s = load_settings()
    assert s.host == "127.0.0.1"
    assert s.port == 8080
    assert s.sandbox_backend == "bwrap"
    assert s.sqlalchemy_url.startswith("sqlite:///")
    assert s.sqlalchemy_url.endswith("/data/nox.db")


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("NOX_PORT", "eighty", "NOX_PORT: Input should be a valid integer"),
        ("NOX_PORT", "70000", "NOX_PORT: Input should be less than or equal to 65535"),
        ("NOX_SANDBOX_BACKEND", "docker", "NOX_SANDBOX_BACKEND: Input should be 'bwrap' or"),
        ("NOX_POOL_SIZE", "-1", "NOX_POOL_SIZE"),
        ("NOX_SANDBOX_PYTHON", "/nonexistent/python", "is not an executable interpreter"),
    ],
)
def test_a_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert fragment in info.value.message
    assert "\n" not in info.value.message


def test_the_token_value_is_never_echoed_in_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOX_API_TOKEN", "x")
    monkeypatch.setenv("NOX_PORT", "bad")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "'x'" not in info.value.message


def test_serve_with_a_bad_value_exits_2_with_one_line(tmp_path: Path) -> None:
    assert serve_refused(tmp_path, NOX_PORT="eighty") == (
        2,
        [
            "nox-api: configuration error: NOX_PORT: Input should be a valid integer, unable "
            "to parse string as an integer (got 'eighty')"
        ],
    )


def test_serve_with_a_bad_policy_file_exits_2_naming_the_field(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("limits:\n  maxima:\n    memory_mib: lots\n")
    proc = subprocess.run(
        [sys.executable, "-m", "nox_api", "serve"],
        env={
            "NOX_POLICY_FILE": str(policy),
            "NOX_DATA_DIR": str(tmp_path / "data"),
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "policy.yaml: limits.maxima.memory_mib: Input should be a valid integer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_token_create_prints_a_working_token(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    monkeypatch.setenv("NOX_DATA_DIR", str(settings.data_dir))
    result = CliRunner().invoke(cli_app, ["token", "create", "--role", "admin", "--name", "ci"])
    assert result.exit_code == 0, result.output
    secret = result.output.strip()
    assert re.fullmatch(r"nox_[A-Za-z0-9_-]{43}", secret)
    db = Database(settings.sqlalchemy_url)
    try:
        principal = TokenService(db).authenticate(secret)
    finally:
        db.close()
    assert principal is not None
    assert (principal.name, principal.role, principal.workspace) == ("ci", Role.ADMIN, "default")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--role", "root", "--name", "x"], "--role must be one of viewer, runner, admin"),
        (["--role", "admin", "--name", "bad\nname"], "token name must be"),
        (["--name", "x", "--workspace", "../etc"], "workspace name"),
    ],
)
def test_token_create_refuses_bad_input(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, args: list[str], fragment: str
) -> None:
    monkeypatch.setenv("NOX_DATA_DIR", str(settings.data_dir))
    result = CliRunner().invoke(cli_app, ["token", "create", *args])
    assert result.exit_code == 2
    assert fragment in result.output


def test_configuration_doc_lists_every_setting() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `(NOX_[A-Z0-9_]+)` \|", doc, flags=re.MULTILINE))
    expected = {f"NOX_{name.upper()}" for name in Settings.model_fields}
    assert documented == expected
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_token_list_and_revoke_offline_are_audited(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    monkeypatch.setenv("NOX_DATA_DIR", str(settings.data_dir))
    runner = CliRunner()
    secret = runner.invoke(cli_app, ["token", "create", "--name", "ci-bot"]).output.strip()
    db = Database(settings.sqlalchemy_url)
    try:
        principal = TokenService(db).authenticate(secret)
        assert principal is not None
        listed = runner.invoke(cli_app, ["token", "list"])
        assert listed.exit_code == 0, listed.output
        assert principal.id in listed.output
        assert "ci-bot" in listed.output
        assert "active" in listed.output
        assert secret not in listed.output
        revoked = runner.invoke(cli_app, ["token", "revoke", principal.id])
        assert revoked.exit_code == 0, revoked.output
        assert TokenService(db).authenticate(secret) is None
        assert "revoked" in runner.invoke(cli_app, ["token", "list"]).output
        unknown = runner.invoke(cli_app, ["token", "revoke", "nope"])
        assert unknown.exit_code == 4
        assert "no token with id 'nope'" in unknown.output
    finally:
        db.close()
    audit_text = (settings.audit_dir / "audit.jsonl").read_text()
    assert '"action":"token.create"' in audit_text
    assert '"action":"token.revoke"' in audit_text
    assert secret not in audit_text
    verified = runner.invoke(cli_app, ["audit", "verify"])
    assert verified.exit_code == 0, verified.output
    assert "audit log intact: 2 entries" in verified.output


def test_audit_verify_exits_1_on_a_tampered_log(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    monkeypatch.setenv("NOX_DATA_DIR", str(settings.data_dir))
    runner = CliRunner()
    for name in ("one", "two", "three"):
        assert runner.invoke(cli_app, ["token", "create", "--name", name]).exit_code == 0
    log = settings.audit_dir / "audit.jsonl"
    assert runner.invoke(cli_app, ["audit", "verify", str(log)]).exit_code == 0
    log.write_text(log.read_text().replace('"name":"two"', '"name":"tw0"'))
    result = runner.invoke(cli_app, ["audit", "verify"])
    assert result.exit_code == 1
    assert "TAMPERED at line 2" in result.output
    assert "edited" in result.output
    missing = runner.invoke(cli_app, ["audit", "verify", str(settings.data_dir / "nope")])
    assert missing.exit_code == 2
