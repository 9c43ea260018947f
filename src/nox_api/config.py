"""Settings from the environment (prefix ``NOX_``), validated once at start-up.

Every setting is listed with its default and unit in ``docs/configuration.md``; a test keeps that
page and this class in step. A bad value stops start-up with one line naming the variable
(:func:`load_settings` raises :class:`~nox_api.errors.ConfigError`, the CLI exits 2).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from nox_api.engine.base import MIB
from nox_api.errors import ConfigError

__all__ = ["Settings", "default_policy_file", "load_settings"]


def _default_python() -> str:
    """The interpreter used inside sandboxes: Debian's own when present (readable by any user and
    under /usr, which every sandbox already sees), else the one running the server."""
    for candidate in ("/usr/bin/python3",):
        if os.access(candidate, os.X_OK):
            return candidate
    return os.path.realpath(sys.executable)


def default_policy_file() -> Path:
    """The policy shipped with Nox: packed into the wheel next to this module, or the
    repository's ``policy/policies.yaml`` when running from a checkout."""
    packed = Path(__file__).with_name("policies.yaml")
    if packed.is_file():
        return packed
    return Path(__file__).resolve().parents[2] / "policy" / "policies.yaml"


class Settings(BaseSettings):
    """Nox server settings. Units are in the names."""

    model_config = SettingsConfigDict(env_prefix="NOX_", extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8080, ge=1, le=65535, description="TCP port of the HTTP server.")
    data_dir: Path = Field(
        Path("data"),
        description="Data folder: database, workspaces, logs. Relative paths start at the "
        "working directory.",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file nox.db in the data folder."
    )
    api_token: SecretStr | None = Field(
        None, description="Optional admin token accepted as is (single-user set-ups)."
    )
    sandbox_backend: Literal["bwrap", "unsafe"] = Field(
        "bwrap", description="bwrap (isolated) or unsafe (no isolation, development only)."
    )
    sandbox_python: str = Field(
        default_factory=_default_python,
        description="Interpreter used inside sandboxes (must be readable by the sandbox user).",
    )
    sandbox_uid: int = Field(
        65534, ge=1, description="Host uid sandboxes run as when the server runs as root."
    )
    sandbox_gid: int = Field(
        65534, ge=1, description="Host gid sandboxes run as when the server runs as root."
    )
    sandbox_cgroups: bool = Field(
        True, description="Use cgroups for memory and process limits when the machine allows."
    )
    pool_size: int = Field(
        2, ge=0, le=64, description="Warm sandboxes kept ready per workspace (0 turns it off)."
    )
    pool_idle_s: float = Field(
        300.0, gt=0, description="Seconds a workspace's warm sandboxes live unused."
    )
    pool_max_workspaces: int = Field(
        16, ge=1, description="Workspaces that may have warm sandboxes at once."
    )
    pool_stems: int = Field(
        2,
        ge=0,
        le=64,
        description="Half-started sandboxes (cgroup joined, no workspace yet) kept for runs the "
        "warm pool misses; used only with cgroups (0 turns them off).",
    )
    max_concurrent_runs: int = Field(
        8, ge=1, le=1024, description="Runs executing at once; more wait for a slot."
    )

    policy_file: Path | None = Field(
        None,
        description="The policy file (limits, rate limits, quotas, shell deny-list); default: "
        "policy/policies.yaml shipped with Nox.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL (redis://host:port/db) for rate limits shared by several "
        "servers; default: kept in this server's memory.",
    )
    audit_key: SecretStr | None = Field(
        None,
        description="Key of the audit log's HMAC chain (16+ characters); default: a random key "
        "in audit.key in the data folder (mode 0600).",
    )
    audit_max_bytes: int = Field(
        10 * MIB, ge=4096, description="Size of the audit log file before it is rotated, bytes."
    )
    max_upload_bytes: int = Field(
        100 * MIB,
        ge=1,
        description="Largest file accepted by /put and PUT /api/files (413 above).",
    )

    history_keep_runs: int = Field(
        100_000, ge=0, description="Runs kept in history per workspace (0: no count limit)."
    )
    history_keep_days: float = Field(
        30.0, ge=0, description="Days a run stays in history (0: no age limit)."
    )
    retention_interval_s: float = Field(
        600.0, gt=0, description="Seconds between two passes of the history retention."
    )
    search_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Time budget of one file search, seconds."
    )
    search_max_bytes: int = Field(
        256 * MIB, ge=1, description="Bytes one file search reads at most, over all files."
    )
    search_file_max_bytes: int = Field(
        10 * MIB, ge=1, description="Files larger than this are searched by name only, bytes."
    )
    file_walks_max: int = Field(
        8,
        ge=1,
        description="Recursive listings and file searches running at once on this server; "
        "more wait NOX_FILE_WALKS_WAIT_S for one to end, then get 429.",
    )
    file_walks_wait_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="Seconds a recursive listing or file search waits for a free walk before "
        "it is refused with 429 (Retry-After: 1).",
    )
    disk_free_min_mib: int = Field(
        1024,
        ge=0,
        description="Free space in the data folder below which /api/health/detailed says "
        "degraded (below a tenth of it: fail), MiB.",
    )
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated addresses or networks (CIDR) of reverse proxies whose "
        "X-Forwarded-For gives the client address (failed-login limit, audit and access log); "
        "default: none, the header is ignored.",
    )
    alert_webhooks: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated http(s) URLs that receive a JSON event (POST) when the "
        "detailed health turns fail or recovers, or the audit chain breaks; default: none.",
    )
    alert_interval_s: float = Field(
        30.0,
        gt=0,
        description="Seconds between two evaluations of the detailed health by the alert "
        "monitor (runs only when NOX_ALERT_WEBHOOKS is set).",
    )
    alert_timeout_s: float = Field(
        5.0, gt=0, le=60, description="Timeout of one webhook delivery attempt, seconds."
    )
    alert_retries: int = Field(
        3,
        ge=0,
        le=10,
        description="Retries of a webhook delivery that failed to connect, timed out or got "
        "5xx, 408 or 429 (backoff 1 s, 2 s, 4 s ... at most 60 s).",
    )
    log_max_bytes: int = Field(
        10 * MIB, ge=4096, description="Size of the server log file before it is rotated, bytes."
    )
    log_backups: int = Field(5, ge=1, le=100, description="Rotated server log files kept.")
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token Prometheus sends to scrape /metrics from another address "
        "(16+ characters); without it only loopback clients may scrape.",
        min_length=16,
    )
    metrics_loopback: bool = Field(
        True,
        description="Let clients on 127.0.0.1/::1 scrape /metrics without a token (set false "
        "when a proxy on the same machine forwards outside requests).",
    )
    metrics_max_workspaces: int = Field(
        50,
        ge=0,
        le=10_000,
        description="Workspaces with their own nox_workspace_storage_bytes series (the biggest; "
        "the rest summed as _other).",
    )
    backup_key: SecretStr | None = Field(
        None,
        description="Backup encryption key: 64 hex characters (AES-256). Either this or "
        "NOX_BACKUP_PASSPHRASE is needed to create or restore backups.",
    )
    backup_passphrase: SecretStr | None = Field(
        None,
        description="Passphrase the backup key is derived from (scrypt, memory-hard), when "
        "NOX_BACKUP_KEY is not set; 12+ characters.",
    )
    ui_session_secret: SecretStr | None = Field(
        None,
        min_length=32,
        description="Key that signs and encrypts the dashboard's session cookies and its CSRF "
        "tokens (32+ characters); default: a random key in ui-session.key in the data folder "
        "(mode 0600).",
    )
    ui_session_max_age_s: int = Field(
        8 * 3600,
        ge=60,
        le=30 * 86400,
        description="Seconds a dashboard sign-in lasts; then the token must be entered again.",
    )
    ui_view_max_bytes: int = Field(
        1 * MIB,
        ge=1024,
        le=64 * MIB,
        description="Bytes of a file the dashboard shows as text at most (the rest: download).",
    )

    @field_validator("sandbox_python")
    @classmethod
    def _python_exists(cls, value: str) -> str:
        path = shutil.which(value) if "/" not in value else value
        if path is None or not os.access(path, os.X_OK):
            raise ValueError(f"{value!r} is not an executable interpreter")
        return os.path.abspath(path)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or network (no '*': name the proxies)"
                ) from None
        return value

    @field_validator("alert_webhooks", "trusted_proxies", mode="before")
    @classmethod
    def _split_webhooks(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("alert_webhooks")
    @classmethod
    def _webhooks_are_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for number, url in enumerate(value, start=1):
            parts = urlsplit(url)
            try:
                port_ok = parts.port is None or parts.port > 0
            except ValueError:
                port_ok = False
            # The URL is never repeated: it may hold a secret.
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"entry {number} is not an http:// or https:// URL with a host")
            if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
                raise ValueError(f"entry {number} holds a space or a control character")
            if not port_ok:
                raise ValueError(f"entry {number} has an invalid port")
        return value

    # -- derived ---------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().absolute()

    @property
    def workspaces_dir(self) -> Path:
        return self.data_path / "workspaces"

    @property
    def staging_dir(self) -> Path:
        return self.data_path / "staging"

    @property
    def probe_dir(self) -> Path:
        """Where sandbox probes make their throw-away workspaces."""
        return self.data_path / "probe"

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'nox.db'}"

    @property
    def audit_dir(self) -> Path:
        return self.data_path / "audit"

    @property
    def logs_dir(self) -> Path:
        return self.data_path / "logs"

    @property
    def backups_dir(self) -> Path:
        return self.data_path / "backups"

    @property
    def policy_path(self) -> Path:
        return (self.policy_file or default_policy_file()).expanduser().absolute()


# Values never repeated in an error: tokens, keys, passphrases, and URLs (they may hold a
# password, e.g. postgresql://nox:secret@db/nox; webhook URLs often carry theirs in the path).
_SECRET_WORDS = ("TOKEN", "KEY", "PASSPHRASE", "PASSWORD", "SECRET", "URL", "WEBHOOK")


def load_settings(**overrides: object) -> Settings:
    """Read the environment; raise :class:`ConfigError` naming the first bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(part) for part in err.get("loc", ())]
        name = f"NOX_{loc[0].upper()}" if loc else "configuration"
        value = os.environ.get(name)
        secret = any(word in name for word in _SECRET_WORDS)
        shown = f" (got {value!r})" if value is not None and not secret else ""
        message = err.get("msg", "invalid value").removeprefix("Value error, ")
        raise ConfigError(f"{name}: {message}{shown}") from None
