"""Settings from the environment (prefix ``NOX_``), validated once at start-up.

Every setting is listed with its default and unit in ``docs/configuration.md``; a test keeps that
page and this class in step. A bad value stops start-up with one line naming the variable
(:func:`load_settings` raises :class:`~nox_api.errors.ConfigError`, the CLI exits 2).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nox_api.engine.base import MIB, Limits
from nox_api.errors import ConfigError

__all__ = ["Settings", "load_settings"]


def _default_python() -> str:
    """The interpreter used inside sandboxes: Debian's own when present (readable by any user and
    under /usr, which every sandbox already sees), else the one running the server."""
    for candidate in ("/usr/bin/python3",):
        if os.access(candidate, os.X_OK):
            return candidate
    return os.path.realpath(sys.executable)


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
    max_concurrent_runs: int = Field(
        8, ge=1, le=1024, description="Runs executing at once; more wait for a slot."
    )

    default_timeout_s: float = Field(10.0, gt=0, description="Wall time of a run by default.")
    max_timeout_s: float = Field(60.0, gt=0, description="Largest wall time a request may ask.")
    default_memory_mib: int = Field(256, ge=16, description="Memory of a run by default.")
    max_memory_mib: int = Field(1024, ge=16, description="Largest memory a request may ask.")
    max_cpu_s: int = Field(
        60, ge=1, description="CPU seconds of a run: the wall time rounded up, at most this."
    )
    max_processes: int = Field(64, ge=1, description="Processes and threads in one run.")
    max_file_size_mib: int = Field(64, ge=1, description="Largest file a run may write.")
    max_open_files: int = Field(256, ge=16, description="Open files in one process of a run.")
    tmp_size_mib: int = Field(64, ge=1, description="Size of each run's private /tmp.")
    output_bytes: int = Field(
        1 * MIB, ge=1024, description="Output kept per stream; more is dropped (truncated)."
    )
    output_hard_bytes: int = Field(
        64 * MIB, ge=1024, description="Output of both streams after which the run is stopped."
    )

    max_code_bytes: int = Field(
        1 * MIB, ge=1, description="Largest code or command accepted (413 above)."
    )
    max_stdin_bytes: int = Field(1 * MIB, ge=0, description="Largest stdin accepted (413 above).")
    max_upload_bytes: int = Field(
        100 * MIB, ge=1, description="Largest file accepted by /put (413 above)."
    )

    @field_validator("sandbox_python")
    @classmethod
    def _python_exists(cls, value: str) -> str:
        path = shutil.which(value) if "/" not in value else value
        if path is None or not os.access(path, os.X_OK):
            raise ValueError(f"{value!r} is not an executable interpreter")
        return os.path.abspath(path)

    @model_validator(mode="after")
    def _defaults_within_maxima(self) -> Settings:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("NOX_DEFAULT_TIMEOUT_S is above NOX_MAX_TIMEOUT_S")
        if self.default_memory_mib > self.max_memory_mib:
            raise ValueError("NOX_DEFAULT_MEMORY_MIB is above NOX_MAX_MEMORY_MIB")
        if self.output_bytes > self.output_hard_bytes:
            raise ValueError("NOX_OUTPUT_BYTES is above NOX_OUTPUT_HARD_BYTES")
        return self

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
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'nox.db'}"

    def ceiling(self) -> Limits:
        """The largest limits any run may get: what warm sandboxes start with."""
        return Limits(
            timeout_s=self.max_timeout_s,
            cpu_s=self.max_cpu_s,
            memory_mib=self.max_memory_mib,
            processes=self.max_processes,
            file_size_mib=self.max_file_size_mib,
            open_files=self.max_open_files,
            tmp_size_mib=self.tmp_size_mib,
            output_bytes=self.output_bytes,
            output_hard_bytes=self.output_hard_bytes,
        )


def load_settings(**overrides: object) -> Settings:
    """Read the environment; raise :class:`ConfigError` naming the first bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(part) for part in err.get("loc", ())]
        name = f"NOX_{loc[0].upper()}" if loc else "configuration"
        value = os.environ.get(name)
        shown = f" (got {value!r})" if value is not None and "TOKEN" not in name else ""
        message = err.get("msg", "invalid value").removeprefix("Value error, ")
        raise ConfigError(f"{name}: {message}{shown}") from None
