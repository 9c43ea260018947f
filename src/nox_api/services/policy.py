"""The policy file: per-run limits, rate limits, workspace quotas and a shell deny-list.

``policy/policies.yaml`` is checked against the models below: unknown keys are refused, every
field has a safe default (an empty file is the default policy) and units are in the field names.
:class:`PolicyStore` keeps the current policy and reloads it on SIGHUP, on a file change or on
request; a file that does not pass is refused with every problem named, and the old policy stays.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
import reprlib
import signal
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal, get_args, get_origin

import limits as limits_lib
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from nox_api.errors import InvalidRequest
from nox_api.services.tokens import Role, is_workspace_name

__all__ = [
    "DEFAULT_DENY_PATTERNS",
    "DEFAULT_ROLE_RATES",
    "LimitsPolicy",
    "MAX_POLICY_BYTES",
    "Policy",
    "PolicyError",
    "PolicyRefusal",
    "PolicyStore",
    "QuotasPolicy",
    "RateLimitsPolicy",
    "RunDefaults",
    "RunMaxima",
    "ShellPolicy",
    "WorkspaceQuota",
    "WorkspaceQuotaOverride",
    "install_sighup",
    "load_policy",
    "parse_policy",
]

log = logging.getLogger("nox.policy")

MIB = 1024 * 1024
GIB = 1024 * MIB
MAX_POLICY_BYTES = 1 * MIB
_MAX_PROBLEMS_SHOWN = 20
_SETTLE_S = 0.2  # a changed file must stay unchanged this long before the watcher reads it
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_CONSISTENCY = "policy_consistency"


def _short_repr() -> reprlib.Repr:
    """A ``repr`` of bounded length and cost, for showing what the file had."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, 60, 60
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 4
    return short


_SHORT = _short_repr()

DEFAULT_ROLE_RATES: dict[Role, str] = {
    Role.VIEWER: "120/minute",
    Role.RUNNER: "60/minute",
    Role.ADMIN: "600/minute",
}
DEFAULT_DENY_PATTERNS: list[str] = [
    r":\(\)\s*\{",  # the classic fork bomb  :(){ :|:& };:
    r"\bmkfs(\.\w+)?\b",  # making a file system
    r"\bdd\b.*\bof=/dev/",  # dd onto a device
    r"\brm\s+(-[\w-]+\s+)*-\w*[rR]\w*\s+(-[\w-]+\s+)*/\*?(\s|;|&|\||$)",  # rm -rf /
]


# --- field types ------------------------------------------------------------------------------


def _no_bool(value: object) -> object:
    """YAML reads ``yes``/``on`` as booleans; a number field must not take one as 1."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "Input should be a number, not a boolean")
    return value


def _empty_if_none(value: object) -> object:
    """A mapping left empty in YAML (``limits:`` and nothing below it) reads as ``{}``."""
    return {} if value is None else value


def _check_rate(value: str) -> str:
    try:
        limits_lib.parse_many(value)
    except ValueError as exc:
        raise PydanticCustomError(
            "rate_limit",
            "not a rate limit like '60/minute' or '10/second;1000/hour': {reason}",
            {"reason": str(exc)},
        ) from None
    return value


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise PydanticCustomError(
            "regex", "not a valid regular expression: {reason}", {"reason": str(exc)}
        ) from None
    return value


def _check_workspace(value: str) -> str:
    if not is_workspace_name(value):
        raise PydanticCustomError(
            "workspace_name",
            "a workspace name is 1-63 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit",
        )
    return value


_Int = Annotated[int, BeforeValidator(_no_bool)]
_Float = Annotated[float, BeforeValidator(_no_bool)]
_Rate = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_check_rate)]
_Pattern = Annotated[
    str, StringConstraints(min_length=1, max_length=1000), AfterValidator(_check_regex)
]
_TokenKey = Annotated[str, StringConstraints(min_length=1, max_length=128)]
_WorkspaceName = Annotated[str, AfterValidator(_check_workspace)]
_Section = BeforeValidator(_empty_if_none)


def _num(value: float) -> str:
    """``90`` for 90.0, ``2.5`` for 2.5."""
    return repr(value) if isinstance(value, float) and not value.is_integer() else str(int(value))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- the schema -------------------------------------------------------------------------------


class RunDefaults(_Model):
    """What a run gets when the request does not ask."""

    timeout_s: _Float = Field(10.0, gt=0, description="Wall time of a run, seconds.")
    memory_mib: _Int = Field(256, ge=16, description="Memory of a run, MiB.")


class RunMaxima(_Model):
    """The most a request may ask; anything above is refused, never lowered."""

    timeout_s: _Float = Field(60.0, gt=0, le=86_400, description="Wall time, seconds.")
    cpu_s: _Int = Field(60, ge=1, le=86_400, description="CPU time, seconds.")
    memory_mib: _Int = Field(1024, ge=16, le=1_048_576, description="Memory, MiB.")
    processes: _Int = Field(64, ge=1, le=65_536, description="Processes and threads.")
    file_size_mib: _Int = Field(64, ge=1, le=1_048_576, description="Largest file written, MiB.")
    open_files: _Int = Field(256, ge=16, le=1_048_576, description="Open file descriptors.")
    tmp_size_mib: _Int = Field(64, ge=1, le=1_048_576, description="Private /tmp, MiB.")
    output_bytes: _Int = Field(
        1 * MIB, ge=0, le=256 * MIB, description="Output kept per stream, bytes."
    )
    output_hard_bytes: _Int = Field(
        64 * MIB, ge=1, le=16 * GIB, description="Both streams; past it the run is stopped, bytes."
    )
    code_bytes: _Int = Field(1 * MIB, ge=1, le=64 * MIB, description="Code or command, bytes.")
    stdin_bytes: _Int = Field(1 * MIB, ge=0, le=1 * GIB, description="Standard input, bytes.")


class LimitsPolicy(_Model):
    """Per-run limits: defaults, maxima and the network (always off)."""

    defaults: Annotated[RunDefaults, _Section] = Field(default_factory=RunDefaults)
    maxima: Annotated[RunMaxima, _Section] = Field(default_factory=RunMaxima)
    network: Literal[False] = Field(False, description="Network access of runs: only off.")

    @field_validator("network", mode="before")
    @classmethod
    def _network_off(cls, value: object) -> object:
        if value is not False:
            raise PydanticCustomError(
                "network_unsupported",
                "network access is not supported by this Nox; only false (off) is allowed",
            )
        return value

    @model_validator(mode="after")
    def _within_maxima(self) -> LimitsPolicy:
        d, m = self.defaults, self.maxima
        issues = [
            f"limits.defaults.{name}: {_num(low)} is above limits.maxima.{name} ({_num(high)})"
            for name, low, high in (
                ("timeout_s", d.timeout_s, m.timeout_s),
                ("memory_mib", d.memory_mib, m.memory_mib),
            )
            if low > high
        ]
        if m.output_bytes > m.output_hard_bytes:
            issues.append(
                f"limits.maxima.output_bytes: {m.output_bytes} is above "
                f"limits.maxima.output_hard_bytes ({m.output_hard_bytes})"
            )
        if issues:
            raise PydanticCustomError(_CONSISTENCY, "{summary}", {"summary": "; ".join(issues)})
        return self


class RateLimitsPolicy(_Model):
    """Request rates in the syntax of the ``limits`` library, e.g. ``60/minute``."""

    roles: Annotated[dict[Role, _Rate], _Section] = Field(
        default_factory=lambda: dict(DEFAULT_ROLE_RATES)
    )
    tokens: Annotated[dict[_TokenKey, _Rate], _Section] = Field(default_factory=dict)
    auth_failures_per_client: _Rate = "20/minute"

    @field_validator("roles", mode="after")
    @classmethod
    def _keep_default_roles(cls, value: dict[Role, str]) -> dict[Role, str]:
        """A role the file leaves out keeps its default rate."""
        return {role: value.get(role, DEFAULT_ROLE_RATES[role]) for role in Role}


class WorkspaceQuota(_Model):
    """What one workspace may use; 0 means none allowed."""

    runs_per_day: _Int = Field(10_000, ge=0, le=100_000_000, description="Runs per day.")
    cpu_seconds_per_day: _Int = Field(
        36_000, ge=0, le=100_000_000, description="CPU-seconds per day."
    )
    storage_mib: _Int = Field(1024, ge=0, le=16_777_216, description="Files kept, MiB.")
    upload_mib_per_day: _Int = Field(1024, ge=0, le=16_777_216, description="Uploads, MiB per day.")


class WorkspaceQuotaOverride(_Model):
    """A workspace's own quota; a field left unset falls back to the default quota."""

    runs_per_day: _Int | None = Field(None, ge=0, le=100_000_000)
    cpu_seconds_per_day: _Int | None = Field(None, ge=0, le=100_000_000)
    storage_mib: _Int | None = Field(None, ge=0, le=16_777_216)
    upload_mib_per_day: _Int | None = Field(None, ge=0, le=16_777_216)


class QuotasPolicy(_Model):
    """The default workspace quota and overrides by workspace name."""

    default: Annotated[WorkspaceQuota, _Section] = Field(default_factory=WorkspaceQuota)
    workspaces: Annotated[
        dict[_WorkspaceName, Annotated[WorkspaceQuotaOverride, _Section]], _Section
    ] = Field(default_factory=dict)


class ShellPolicy(_Model):
    """Regular expressions refused in ``/run_sh`` commands: defence in depth, not a boundary."""

    deny_patterns: list[_Pattern] = Field(
        default_factory=lambda: list(DEFAULT_DENY_PATTERNS), max_length=1000
    )


class Policy(_Model):
    """The whole policy file."""

    version: Literal[1] = 1
    limits: Annotated[LimitsPolicy, _Section] = Field(default_factory=LimitsPolicy)
    rate_limits: Annotated[RateLimitsPolicy, _Section] = Field(default_factory=RateLimitsPolicy)
    quotas: Annotated[QuotasPolicy, _Section] = Field(default_factory=QuotasPolicy)
    shell: Annotated[ShellPolicy, _Section] = Field(default_factory=ShellPolicy)

    _deny: tuple[re.Pattern[str], ...] = PrivateAttr(default=())

    @field_validator("version", mode="before")
    @classmethod
    def _version_not_bool(cls, value: object) -> object:
        return _no_bool(value)

    def model_post_init(self, context: Any, /) -> None:
        self._deny = tuple(re.compile(p) for p in self.shell.deny_patterns)

    def quota_for(self, workspace: str) -> WorkspaceQuota:
        """The workspace's quota: its override where set, the default elsewhere."""
        override = self.quotas.workspaces.get(workspace)
        if override is None:
            return self.quotas.default
        merged = self.quotas.default.model_dump() | override.model_dump(exclude_none=True)
        return WorkspaceQuota(**merged)

    def rate_for(self, role: Role, token_id: str, token_name: str) -> str:
        """The rate limit of a token: by its id, else by its name, else its role's."""
        tokens = self.rate_limits.tokens
        if token_id in tokens:
            return tokens[token_id]
        if token_name in tokens:
            return tokens[token_name]
        return self.rate_limits.roles[role]

    def shell_denied(self, cmd: str) -> str | None:
        """The first deny pattern found in ``cmd``, or None when none is."""
        for pattern in self._deny:
            if pattern.search(cmd):
                return pattern.pattern
        return None

    def to_public_dict(self) -> dict[str, Any]:
        """The effective policy as JSON-safe data."""
        return self.model_dump(mode="json")


# --- errors -----------------------------------------------------------------------------------


class PolicyError(InvalidRequest):
    """A policy file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        shown = list(self.problems[:_MAX_PROBLEMS_SHOWN])
        if len(self.problems) > len(shown):
            shown.append(f"... and {len(self.problems) - len(shown)} more problems")
        super().__init__("\n".join(shown))


def _path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY_RE.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "(top level)"


def _fields_at(loc: Sequence[str | int]) -> list[str]:
    """The field names of the model that ``loc`` points into, for a "did you mean" hint."""
    tp: Any = Policy
    parts = list(loc)
    while parts:
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
            return []
        field = tp.model_fields.get(str(parts.pop(0)))
        if field is None:
            return []
        tp = field.annotation
        if get_origin(tp) is dict:
            tp = get_args(tp)[1]
            if not parts:
                return []
            parts.pop(0)  # the key
        while get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _problems(exc: ValidationError, source: str) -> list[str]:
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        kind = err["type"]
        if kind == _CONSISTENCY:
            lines.extend(f"{source}: {issue}" for issue in err["msg"].split("; "))
            continue
        is_key = bool(loc) and loc[-1] == "[key]"
        if is_key:
            loc.pop()
        if kind == "extra_forbidden":
            reason = "unknown field"
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc[:-1]), n=1)
            if close:
                reason += f" (did you mean {close[0]!r}?)"
        elif kind == "missing":
            reason = "required field missing"
        else:
            msg = err["msg"]
            if kind == "value_error" and "ctx" in err:
                msg = str(err["ctx"]["error"])
            reason = f"{'invalid key: ' if is_key else ''}{msg} (got {_SHORT.repr(err['input'])})"
        lines.append(f"{source}: {_path(loc)}: {reason}")
    return lines


# --- reading ----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        reason = ", ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        mark = exc.problem_mark or exc.context_mark
        if mark is None:
            raise PolicyError([f"{source}: YAML syntax error: {reason}"]) from None
        where = f"line {mark.line + 1}"
        raise PolicyError(
            [f"{source}: {where}: YAML syntax error: {reason} (column {mark.column + 1})"]
        ) from None
    except yaml.YAMLError as exc:
        raise PolicyError([f"{source}: YAML syntax error: {exc}"]) from None
    except RecursionError:
        raise PolicyError([f"{source}: YAML error: nested too deeply"]) from None
    except ValueError as exc:  # e.g. a date like 2024-13-45
        raise PolicyError([f"{source}: YAML error: {exc}"]) from None


def parse_policy(text: str, source: str = "policy") -> Policy:
    """The policy in ``text``; ``source`` names it in error messages."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
        raise PolicyError([f"{source}: the policy is larger than {MAX_POLICY_BYTES} bytes"])
    data = _load_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(
            [
                f"{source}: the policy must be a mapping of sections (limits, rate_limits, "
                f"quotas, shell), not a {type(data).__name__}"
            ]
        )
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_problems(exc, source)) from None


def _read(path: Path) -> bytes:
    source = path.name
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise PolicyError([f"{source}: not a regular file ({path})"])
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except FileNotFoundError:
        raise PolicyError([f"{source}: policy file not found ({path})"]) from None
    except OSError as exc:
        raise PolicyError([f"{source}: cannot read the policy file: {exc.strerror}"]) from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError([f"{source}: the file is larger than {MAX_POLICY_BYTES} bytes"])
    return data


def _parse_bytes(data: bytes, source: str) -> Policy:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PolicyError([f"{source}: not UTF-8 text (byte {exc.start})"]) from None
    return parse_policy(text, source)


def load_policy(path: Path) -> Policy:
    """The policy in the file at ``path``."""
    path = Path(path)
    return _parse_bytes(_read(path), path.name)


# --- the store --------------------------------------------------------------------------------

_Fingerprint = tuple[int, int, int] | None


def _fingerprint(path: Path) -> _Fingerprint:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


@dataclass(frozen=True, slots=True)
class _Loaded:
    policy: Policy
    loaded_at: datetime
    sha256: str


@dataclass(frozen=True, slots=True)
class PolicyRefusal:
    """The last reload that was refused (the old policy stayed): why and when (UTC)."""

    message: str
    at: datetime


class PolicyStore:
    """The current policy of the file at ``path``, swapped whole on a successful reload.

    The constructor loads the file and raises :class:`PolicyError` when it cannot.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.RLock()  # serialises reloads; readers never take it
        self._listeners: list[Callable[[Policy, Policy], None]] = []
        self._watcher: tuple[threading.Thread, threading.Event] | None = None
        self._refusal: PolicyRefusal | None = None
        self._seen = _fingerprint(self._path)
        data = _read(self._path)
        self._state = _Loaded(
            _parse_bytes(data, self._path.name), datetime.now(UTC), hashlib.sha256(data).hexdigest()
        )

    @property
    def path(self) -> Path:
        return self._path

    @property
    def current(self) -> Policy:
        """The policy in force."""
        return self._state.policy

    @property
    def loaded_at(self) -> datetime:
        """When the policy in force was last read from the file (UTC)."""
        return self._state.loaded_at

    @property
    def source_sha256(self) -> str:
        """SHA-256 (hex) of the file text the policy in force was read from."""
        return self._state.sha256

    @property
    def last_refusal(self) -> PolicyRefusal | None:
        """Why the last reload was refused (the file on disk is then not the policy in force),
        or None when the last reload, or the first load, succeeded."""
        return self._refusal

    def on_change(self, callback: Callable[[Policy, Policy], None]) -> Callable[[], None]:
        """Call ``callback(old, new)`` after each reload that changed the policy; returns a
        function that removes it. Callbacks run in the reloading thread, one reload at a time."""
        with self._lock:
            self._listeners.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return remove

    def reload(self) -> Policy:
        """Read the file again and return the policy in force; raises :class:`PolicyError` and
        keeps the old policy when the file cannot be used."""
        return self._reload()[0]

    def _reload(self) -> tuple[Policy, bool]:
        with self._lock:
            self._seen = _fingerprint(self._path)  # before reading: a later write is seen again
            try:
                data = _read(self._path)
                new = _parse_bytes(data, self._path.name)
            except PolicyError as exc:
                self._refusal = PolicyRefusal(exc.message, datetime.now(UTC))
                raise
            self._refusal = None
            old = self._state.policy
            changed = new != old
            self._state = _Loaded(
                new if changed else old, datetime.now(UTC), hashlib.sha256(data).hexdigest()
            )
            if changed:
                for callback in list(self._listeners):
                    try:
                        callback(old, new)
                    except Exception:
                        log.exception("a policy change listener failed")
            return self._state.policy, changed

    def _reload_logged(self, trigger: str) -> bool:
        """Reload and log the outcome; False when the file was refused."""
        try:
            _, changed = self._reload()
        except PolicyError as exc:
            log.warning(
                "policy reload on %s refused, the old policy stays:\n%s", trigger, exc.message
            )
            return False
        except Exception:
            log.exception("policy reload on %s failed, the old policy stays", trigger)
            return False
        log.info(
            "policy reloaded on %s from %s (%s, sha256 %s)",
            trigger,
            self._path,
            "changed" if changed else "unchanged",
            self.source_sha256[:12],
        )
        return True

    def start_watching(self, interval_s: float = 1.0) -> None:
        """Poll the file every ``interval_s`` seconds in a daemon thread and reload it when its
        mtime, size or inode changed. Does nothing when already watching."""
        if not interval_s > 0:
            raise ValueError("interval_s must be above 0")
        with self._lock:
            if self._watcher is not None:
                return
            stop = threading.Event()
            thread = threading.Thread(
                target=self._watch, args=(interval_s, stop), name="nox-policy-watch", daemon=True
            )
            self._watcher = (thread, stop)
        thread.start()

    def stop_watching(self) -> None:
        """Stop the watcher thread, if any, and wait for it."""
        with self._lock:
            watcher, self._watcher = self._watcher, None
        if watcher is None:
            return
        thread, stop = watcher
        stop.set()
        if thread is not threading.current_thread():
            thread.join(timeout=10)

    def _watch(self, interval_s: float, stop: threading.Event) -> None:
        settle_s = min(interval_s, _SETTLE_S)
        while not stop.wait(interval_s):
            seen = _fingerprint(self._path)
            if seen == self._seen:
                continue
            # An editor may write in steps: read the file only once it stopped changing.
            if stop.wait(settle_s):
                return
            if _fingerprint(self._path) != seen:
                continue
            if seen is not None and seen[1] == 0:
                # Truncated and not written yet (`cat new > policies.yaml` from a slow writer):
                # an empty file would load as all defaults. Wait for its content.
                continue
            self._reload_logged("file change")


def install_sighup(store: PolicyStore) -> bool:
    """Reload ``store`` on SIGHUP (in a short-lived thread) and log the outcome. Only possible
    from the main thread; returns False elsewhere or where SIGHUP does not exist."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return False

    def on_sighup(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(
            target=store._reload_logged, args=("SIGHUP",), name="nox-policy-sighup", daemon=True
        ).start()

    try:
        signal.signal(signal.SIGHUP, on_sighup)
    except ValueError:  # not the main interpreter
        return False
    return True
