"""Tamper-evident, append-only audit log: one JSON line per security-relevant event.

Each line is the canonical JSON of its entry (sorted keys, no spaces, UTF-8) with
``,"mac":"<hex>"`` spliced in before the final ``}``. The MAC is HMAC-SHA256 of the canonical
bytes under the audit key; the entry holds ``prev``, the MAC of the line before it (64 zeros for
the first line ever), so the lines form a chain that continues across rotated files. A checkpoint
kept outside the log (count and last MAC) detects a cut tail. :func:`verify_files` reports the
first bad line and why: ``wrong key``, ``edited``, ``removed``, ``reordered`` or ``truncated``.

Appends take a ``threading.Lock`` and an ``fcntl.flock`` on ``audit.lock``, so threads and
several processes may share one folder; each line is written by one ``os.write`` on an
``O_APPEND`` descriptor and fsync'ed. POSIX only.

Limits, by design: without a checkpoint a cut tail cannot be told from a shorter log; whoever holds
the key can rewrite the whole chain; editing only a line's ``kid`` reads as ``wrong key``. A new
key needs a new log folder: lines of another key read as ``wrong key``. When an append finds the
log shorter than its checkpoint (the log was cut or deleted), the chain goes on from the
checkpoint, so :func:`verify_files` later reports the gap as ``removed``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from nox_api.textfile import reverse_lines

__all__ = [
    "AuditError",
    "AuditEvent",
    "AuditLog",
    "CURRENT_FILE",
    "Checkpoint",
    "CheckpointStore",
    "DEFAULT_MAX_BYTES",
    "FileCheckpointStore",
    "GENESIS_MAC",
    "KEY_FILE",
    "MemoryCheckpointStore",
    "OUTCOMES",
    "VerifyReport",
    "fsync_dir",
    "key_id",
    "load_or_create_key",
    "verify_files",
]

CURRENT_FILE = "audit.jsonl"
KEY_FILE = "audit.key"
LOCK_FILE = "audit.lock"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
GENESIS_MAC = "0" * 64
OUTCOMES = frozenset({"ok", "denied", "failed", "error"})
MIN_KEY_LENGTH = 16
MAX_FIELD_CHARS = 4096
MAX_DETAILS_BYTES = 8192

_ROTATED_RE = re.compile(r"audit-(\d{6,})\.jsonl")
_ACTION_RE = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,63}")
_KEY_ID_LABEL = b"nox-audit-key-id"
_MAC_PREFIX = b',"mac":"'
_MAC_SUFFIX = b'"}'
_MAC_TAIL = len(_MAC_PREFIX) + 64 + len(_MAC_SUFFIX)  # 74 bytes after the canonical body
_SEQ_FIELD = b',"seq":'
_PREV_FIELD = b',"prev":"'
_KID_FIELD = b',"kid":"'
_STR_FIELDS = (
    "actor_id",
    "actor_name",
    "role",
    "workspace",
    "target",
    "client",
    "request_id",
)
# A details key is refused when one of its words (split at '_', '-', '.', digits and camelCase)
# is one of these, or when it contains one of the fragments anywhere.
_SECRET_WORDS = frozenset(
    {
        "apikey",
        "authorization",
        "cookie",
        "credential",
        "credentials",
        "key",
        "keys",
        "passphrase",
        "passwd",
        "password",
        "passwords",
        "pwd",
        "secret",
        "secrets",
        "token",
        "tokens",
    }
)
_SECRET_FRAGMENTS = ("token", "secret", "passw", "apikey", "privatekey")
_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


class AuditError(Exception):
    """The log cannot be appended to (for example its last line is damaged)."""


def _empty_details() -> Mapping[str, object]:
    return MappingProxyType({})


def _looks_secret(name: str) -> bool:
    lowered = name.lower()
    if any(fragment in lowered for fragment in _SECRET_FRAGMENTS):
        return True
    return any(word.lower() in _SECRET_WORDS for word in _WORD_RE.findall(name))


def _check_detail_keys(value: object, path: str) -> None:
    if isinstance(value, Mapping):
        for name, item in value.items():
            if not isinstance(name, str):
                raise ValueError(f"details key {name!r} at {path} must be a string")
            if _looks_secret(name):
                raise ValueError(
                    f"details key {name!r} at {path} looks like a secret; "
                    "secrets never go into the audit log"
                )
            _check_detail_keys(item, f"{path}.{name}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_detail_keys(item, f"{path}[{index}]")


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One security-relevant event. Never put a secret in it: ``details`` keys named like
    token, secret, password or key are refused with ValueError; ``details`` is copied, must be
    JSON-serialisable and at most 8 KiB."""

    action: str
    outcome: str
    actor_id: str | None = None
    actor_name: str | None = None
    role: str | None = None
    workspace: str | None = None
    target: str | None = None
    client: str | None = None
    request_id: str | None = None
    details: Mapping[str, object] = field(default_factory=_empty_details)

    def __post_init__(self) -> None:
        if not isinstance(self.action, str) or not _ACTION_RE.fullmatch(self.action):
            raise ValueError(
                f"action {self.action!r} must be 1-64 characters of a-z, 0-9, '_', '.', ':', '-'"
            )
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} must be one of {sorted(OUTCOMES)}")
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string or None, not {type(value).__name__}")
            if len(value) > MAX_FIELD_CHARS:
                raise ValueError(f"{name} is longer than {MAX_FIELD_CHARS} characters")
            value.encode()  # a lone surrogate raises UnicodeEncodeError, a ValueError
        if not isinstance(self.details, Mapping):
            raise TypeError("details must be a mapping")
        _check_detail_keys(self.details, "details")
        try:
            text = json.dumps(
                dict(self.details),
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=False,
                allow_nan=False,
            )
            size = len(text.encode())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"details must be JSON-serialisable: {exc}") from exc
        if size > MAX_DETAILS_BYTES:
            raise ValueError(f"details take {size} bytes, more than {MAX_DETAILS_BYTES}")
        object.__setattr__(self, "details", MappingProxyType(json.loads(text)))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The chain's length and its last MAC, kept outside the log."""

    count: int
    last_mac: str

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"checkpoint count {self.count!r} must be an integer >= 0")
        if not isinstance(self.last_mac, str):
            raise TypeError("checkpoint last_mac must be a string")


class CheckpointStore(Protocol):
    """Where :class:`AuditLog` keeps its checkpoint; ``save`` runs inside the append lock."""

    def load(self) -> Checkpoint | None: ...

    def save(self, cp: Checkpoint) -> None: ...


class MemoryCheckpointStore:
    """A checkpoint held in memory (tests, benchmarks)."""

    def __init__(self, cp: Checkpoint | None = None) -> None:
        self._cp = cp

    def load(self) -> Checkpoint | None:
        return self._cp

    def save(self, cp: Checkpoint) -> None:
        self._cp = cp


class FileCheckpointStore:
    """A checkpoint in a small JSON file, replaced atomically (temp file, fsync, rename).

    The folder is not fsync'ed after the rename: a crash may bring back the previous checkpoint,
    which is shorter and so still verifies."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self._fsync = fsync

    def load(self) -> Checkpoint | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            return Checkpoint(count=data["count"], last_mac=data["last_mac"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"audit checkpoint {self.path} is damaged: {exc}") from exc

    def save(self, cp: Checkpoint) -> None:
        data = json.dumps({"count": cp.count, "last_mac": cp.last_mac}).encode()
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        try:
            try:
                _write_all(fd, data)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Outcome of a verification. ``entries``: lines that verified before the first bad one
    (all of them when ``ok``); ``first_bad_line``: 1-based across all files in chain order;
    ``reason`` starts with ``wrong key``, ``edited``, ``removed``, ``reordered`` or
    ``truncated``; ``file``: name of the file holding the bad line."""

    ok: bool
    entries: int
    first_bad_line: int | None = None
    reason: str | None = None
    file: str | None = None


def key_id(key: bytes) -> str:
    """First 16 hex characters of HMAC-SHA256(key, b"nox-audit-key-id")."""
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_key_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"audit key {path} is not a regular file")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # fixed rather than refused; fails unless we own it
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    text = raw.strip()
    if len(text) != 64 or text.strip(b"0123456789abcdef"):
        raise ValueError(f"audit key {path} must hold 64 lowercase hex characters")
    return bytes.fromhex(text.decode("ascii"))


def _create_key_file(path: Path) -> None:
    """Write a new key to a private temp file, then link it into place: another process sees
    either no key file or a complete one; the first link wins."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _OPEN_FLAGS, 0o600)
    try:
        try:
            _write_all(fd, secrets.token_bytes(32).hex().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
        fsync_dir(path.parent)
    finally:
        os.unlink(tmp)


def load_or_create_key(data_dir: Path, env_value: str | None) -> bytes:
    """The audit key: ``env_value`` (``NOX_AUDIT_KEY``; UTF-8, at least 16 characters; an empty
    string is refused, not ignored) when given, else the 32 bytes in ``data_dir/audit.key``
    (64 hex characters), created mode 0600 when missing. A key file readable by group or others
    is chmod'ed to 0600."""
    if env_value is not None:
        if len(env_value) < MIN_KEY_LENGTH:
            raise ValueError(f"the audit key must be at least {MIN_KEY_LENGTH} characters")
        return env_value.encode()
    data_dir = Path(data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read_key_file(path)
    _create_key_file(path)
    return _read_key_file(path)


# ---------------------------------------------------------------------------------------------
# Verification


_Source = tuple[str, Callable[[], bytes]]


def _hex_mac_function(key: bytes) -> Callable[[bytes], bytes]:
    """hex HMAC-SHA256 under ``key`` as ASCII bytes; the keyed state is built once."""
    base = hmac.new(key, digestmod=hashlib.sha256)

    def mac(data: bytes) -> bytes:
        h = base.copy()
        h.update(data)
        return h.hexdigest().encode()

    return mac


def _canonical(entry: Mapping[str, object]) -> bytes:
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _splice_mac(body: bytes, mac: str) -> bytes:
    return body[:-1] + _MAC_PREFIX + mac.encode() + _MAC_SUFFIX


def _mac_failure_reason(line: bytes, n: int, kid: str) -> str:
    """Why a line's MAC does not verify: another key, re-formatted, or changed content."""
    try:
        obj = json.loads(line)
    except ValueError:
        return f"edited: line {n} is not valid JSON"
    if not isinstance(obj, dict):
        return f"edited: line {n} is not a JSON object"
    line_kid = obj.get("kid")
    if isinstance(line_kid, str) and line_kid != kid:
        return f"wrong key: line {n} was written with key id {line_kid}, this key's id is {kid}"
    mac = obj.pop("mac", None)
    if not isinstance(mac, str):
        return f"edited: line {n} has no MAC"
    try:
        canonical = _splice_mac(_canonical(obj), mac)
    except ValueError:
        canonical = b""
    if canonical != line:
        return f"edited: line {n} is not in canonical form (re-formatted or altered)"
    return f"edited: line {n} does not match its MAC (content changed)"


def _loose_entry(line: bytes) -> dict[str, object] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _loose_seq(line: bytes) -> int | None:
    entry = _loose_entry(line)
    seq = entry.get("seq") if entry is not None else None
    return seq if isinstance(seq, int) else None


def _find_seq(target: int, rest: Sequence[bytes], later: Sequence[_Source], line_no: int) -> int:
    """Global line number of the first later line whose seq is ``target``, or 0."""
    for line in rest:
        if _loose_seq(line) == target:
            return line_no
        line_no += 1
    for _, read in later:
        for line in read().split(b"\n")[:-1]:
            if _loose_seq(line) == target:
                return line_no
            line_no += 1
    return 0


def _bad(n: int, name: str | None, reason: str) -> VerifyReport:
    return VerifyReport(ok=False, entries=n - 1, first_bad_line=n, reason=reason, file=name)


@dataclass(slots=True)
class _Position:
    """Where the verifier stopped: global line ``n``, ``lines[offset]`` of ``sources[index]``."""

    n: int
    index: int
    offset: int
    lines: list[bytes]
    sources: Sequence[_Source]


def _seq_reason(at: _Position, seq: int, last_seq: int) -> str:
    n = at.n
    expected = last_seq + 1
    if seq < expected:
        return f"reordered: line {n} has seq {seq} after seq {last_seq}"
    found = _find_seq(expected, at.lines[at.offset + 1 :], at.sources[at.index + 1 :], n + 1)
    if found:
        return f"reordered: line {n} has seq {seq}, seq {expected} comes later at line {found}"
    return (
        f"removed: {seq - expected} line(s) missing before line {n} "
        f"(seq jumps from {last_seq} to {seq})"
    )


def _chain_reason(body: bytes, at: _Position, kid: bytes, last_seq: int, last_mac: bytes) -> str:
    """Why a line whose MAC verifies does not continue the chain."""
    n = at.n
    entry = _loose_entry(body)
    seq = entry.get("seq") if entry is not None else None
    if entry is None or not isinstance(seq, int) or not isinstance(entry.get("prev"), str):
        return f"edited: line {n} is not a valid audit entry"
    if str(entry.get("kid")).encode() != kid:
        return f"edited: line {n} has a key id that is not this key's"
    if seq != last_seq + 1:
        return _seq_reason(at, seq, last_seq)
    if str(entry["prev"]).encode() != last_mac:
        return (
            f"removed: line {n} does not chain to the line before it (its prev MAC differs): "
            "lines were removed there"
        )
    return f"edited: line {n} is not a valid audit entry"  # pragma: no cover - fast path agrees


def _final_report(
    checkpoint: Checkpoint | None,
    n: int,
    last_seq: int,
    seen: tuple[int, bytes, str] | None,
    name: str | None,
) -> VerifyReport:
    """All ``n`` lines verified, the last with seq ``last_seq``: compare with the checkpoint.
    ``seen``: line number, MAC and file of the line whose seq is the checkpoint's count."""
    if checkpoint is None:
        return VerifyReport(ok=True, entries=n)
    if checkpoint.count > last_seq:
        reason = (
            f"truncated: the checkpoint records {checkpoint.count} lines, the log ends at "
            f"seq {last_seq}"
        )
        return VerifyReport(ok=False, entries=n, first_bad_line=n + 1, reason=reason, file=name)
    # When ``seen`` is None the checkpointed line lies before these files (``partial``).
    if checkpoint.count > 0 and seen is not None and seen[1] != checkpoint.last_mac.encode():
        reason = (
            f"truncated: line {seen[0]} (seq {checkpoint.count}) differs from the checkpoint's; "
            "the tail was cut and rewritten"
        )
        return VerifyReport(
            ok=False, entries=n, first_bad_line=seen[0], reason=reason, file=seen[2]
        )
    return VerifyReport(ok=True, entries=n)


def _verify(
    sources: Sequence[_Source],
    key: bytes,
    checkpoint: Checkpoint | None,
    start: tuple[int, bytes] | None = None,
) -> VerifyReport:
    kid_text = key_id(key)
    kid = kid_text.encode()
    mac_of = _hex_mac_function(key)
    cp_count = checkpoint.count if checkpoint is not None else 0
    seen: tuple[int, bytes, str] | None = None
    name = ""
    n = 0
    last_seq, last_mac = start if start is not None else (0, GENESIS_MAC.encode())
    tail = _MAC_TAIL
    mac_start = _MAC_TAIL - len(_MAC_PREFIX)
    for index, (name, read) in enumerate(sources):
        lines = read().split(b"\n")
        partial = lines.pop()  # b"" when the file ends with a newline (or is empty)
        for offset, line in enumerate(lines):
            n += 1
            # The MAC covers the raw bytes, so a line that verifies is byte for byte what the
            # writer produced: canonical, and its fields can be found without parsing it.
            body = line[:-tail] + b"}"
            mac = line[-66:-2]
            if (
                line[-tail:-mac_start] != _MAC_PREFIX
                or line[-2:] != _MAC_SUFFIX
                or mac_of(body) != mac
            ):
                return _bad(n, name, _mac_failure_reason(line, n, kid_text))
            # "details" (the only nested value) sorts before kid, prev and seq, and no string
            # value holds an unescaped quote, so the last match of each is the top-level field.
            k = body.rfind(_KID_FIELD) + 8
            p = body.rfind(_PREV_FIELD) + 9
            s = body.rfind(_SEQ_FIELD) + 7
            end = body.find(b",", s)
            if (
                k < 8
                or p < 9
                or s < 7
                or body[k : k + 16] != kid
                or body[s:end] != b"%d" % (last_seq + 1)
                or body[p : p + 64] != last_mac
                or body[p + 64 : p + 65] != b'"'
            ):
                at = _Position(n, index, offset, lines, sources)
                return _bad(n, name, _chain_reason(body, at, kid, last_seq, last_mac))
            last_seq += 1
            last_mac = mac
            if last_seq == cp_count:
                seen = (n, mac, name)
        if partial:
            return _bad(n + 1, name, f"truncated: line {n + 1} is incomplete (no final newline)")
    return _final_report(checkpoint, n, last_seq, seen, name or None)


def _chain_start(paths: Sequence[Path]) -> tuple[int, bytes] | None:
    """seq - 1 and ``prev`` of the first line of ``paths``, trusted as the chain's start."""
    for path in paths:
        with Path(path).open("rb") as f:
            first = f.readline().rstrip(b"\n")
        if not first:
            continue
        entry = _loose_entry(first)
        seq = entry.get("seq") if entry is not None else None
        prev = entry.get("prev") if entry is not None else None
        if isinstance(seq, int) and seq > 0 and isinstance(prev, str):
            return seq - 1, prev.encode()
        return None  # a damaged first line: reported as such
    return None


def verify_files(
    paths: Sequence[Path],
    key: bytes,
    checkpoint: Checkpoint | None,
    *,
    partial: bool = False,
) -> VerifyReport:
    """Verify the log files ``paths`` (in chain order: oldest rotated first, current last).

    By default they must hold the whole chain, from seq 1. ``partial=True`` checks a later part
    of it (say one rotated file): the first line's seq and prev are taken as given, line numbers
    count from the first given file, and a checkpoint is compared by seq."""
    start = _chain_start(paths) if partial else None
    sources = [(Path(path).name, Path(path).read_bytes) for path in paths]
    return _verify(sources, key, checkpoint, start)


# ---------------------------------------------------------------------------------------------
# Writing and reading


def _utc_now() -> str:
    now = datetime.now(UTC)
    return f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z"


def _last_line(fd: int, size: int) -> bytes:
    """The last line of a file of ``size`` bytes, without its newline."""
    if os.pread(fd, 1, size - 1) != b"\n":
        raise AuditError("the audit log's last line is incomplete; repair it before appending")
    pos = size - 1  # buf holds the bytes from pos up to the final newline
    buf = b""
    while pos > 0:
        step = min(4096, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        newline = buf.rfind(b"\n")
        if newline >= 0:
            return buf[newline + 1 :]
    return buf


def _pread_all(fd: int, size: int) -> bytes:
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 24), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _parse_tail(line: bytes) -> tuple[int, str]:
    try:
        obj = json.loads(line)
        seq, mac = obj["seq"], obj["mac"]
    except (ValueError, TypeError, KeyError) as exc:
        raise AuditError(f"the audit log's last line is damaged: {exc}") from exc
    if not isinstance(seq, int) or not isinstance(mac, str) or len(mac) != 64:
        raise AuditError("the audit log's last line is damaged: bad seq or mac")
    return seq, mac


@dataclass(frozen=True, slots=True)
class _Tail:
    seq: int
    mac: str
    ino: int
    size: int


_LIVE_LOGS: weakref.WeakSet[AuditLog] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for log in list(_LIVE_LOGS):
        log._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class AuditLog:
    """The audit log in ``directory``: ``audit.jsonl`` and rotated ``audit-000001.jsonl``, ...
    (older first). ``fsync=False`` skips the fsyncs (tests, benchmarks)."""

    def __init__(
        self,
        directory: Path,
        key: bytes,
        checkpoint: CheckpointStore | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        fsync: bool = True,
    ) -> None:
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"the audit key must be at least {MIN_KEY_LENGTH} bytes")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._key = key
        self._kid = key_id(key)
        self._checkpoint = checkpoint
        self._fsync = fsync
        self._current = self.directory / CURRENT_FILE
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._retire_lock_fd = False
        self._fd: int | None = None
        self._fd_ino = -1
        self._tail: _Tail | None = None
        _LIVE_LOGS.add(self)

    @property
    def checkpoint_store(self) -> CheckpointStore | None:
        return self._checkpoint

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the descriptors; a later append opens them again."""
        with self._lock:
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None
        self._fd_ino = -1

    @contextlib.contextmanager
    def suspended(self, reload_key: Callable[[], bytes] | None = None) -> Iterator[None]:
        """Hold every append (this process's threads and, through ``audit.lock``, other
        processes) while the log's folder is replaced, say by a restore. On exit the log
        reopens: it forgets its descriptors and cached tail, so the next append continues
        whatever chain the folder holds then, under the key ``reload_key`` returns (when
        given)."""
        with self._locked():
            try:
                yield
            finally:
                try:
                    if reload_key is not None:
                        key = reload_key()
                        self._key, self._kid = key, key_id(key)
                finally:
                    if self._fd is not None:
                        os.close(self._fd)
                    self._fd, self._fd_ino, self._tail = None, -1, None
                    # The lock file may have been replaced with its folder: the next append
                    # opens the one there. (``_locked`` unlocks the old one by this descriptor.)
                    self._retire_lock_fd = True

    def snapshot_files(self) -> list[tuple[str, int, int]]:
        """``(name, descriptor, size)`` of each log file in chain order, opened under the append
        lock: reading ``size`` bytes of each gives the chain as it stood then (files only grow
        or are renamed by a rotation). The caller closes the descriptors."""
        opened: list[tuple[str, int, int]] = []
        with self._locked():
            try:
                for path in self.files():
                    fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
                    opened.append((path.name, fd, os.fstat(fd).st_size))
            except BaseException:
                for _, fd, _ in opened:
                    os.close(fd)
                raise
        return opened

    def _forget_after_fork(self) -> None:
        # The child shares the parent's open file descriptions (and so its flock): use its own.
        self._lock = threading.Lock()
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = None
        self._fd_ino = -1
        self._tail = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self._lock_fd is None:
                self._lock_fd = os.open(
                    self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600
                )
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                if self._retire_lock_fd:
                    os.close(self._lock_fd)
                    self._lock_fd, self._retire_lock_fd = None, False

    def _rotated(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.iterdir():
            match = _ROTATED_RE.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
        found.sort()
        return found

    def files(self) -> list[Path]:
        """The log files in chain order: rotated ones oldest first, then the current one."""
        paths = [path for _, path in self._rotated()]
        if self._current.exists():
            paths.append(self._current)
        return paths

    def _open_current(self) -> tuple[int, os.stat_result]:
        """A descriptor on the current file (re-opened if another process rotated it)."""
        try:
            st = os.stat(self._current)
        except FileNotFoundError:
            st = None
        if self._fd is not None and st is not None and st.st_ino == self._fd_ino:
            return self._fd, st
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        fd = os.open(self._current, os.O_RDWR | os.O_APPEND | os.O_CREAT | _OPEN_FLAGS, 0o600)
        if st is None and self._fsync:
            fsync_dir(self.directory)
        st = os.fstat(fd)
        self._fd, self._fd_ino = fd, st.st_ino
        return fd, st

    def _read_tail(self, fd: int, size: int) -> tuple[int, str]:
        """seq and MAC of the chain's last line, from the files (and the checkpoint)."""
        if size > 0:
            seq, mac = _parse_tail(_last_line(fd, size))
        else:
            seq, mac = 0, GENESIS_MAC
            rotated = self._rotated()
            if rotated:
                old = os.open(rotated[-1][1], os.O_RDONLY | _OPEN_FLAGS)
                try:
                    old_size = os.fstat(old).st_size
                    if old_size > 0:
                        seq, mac = _parse_tail(_last_line(old, old_size))
                finally:
                    os.close(old)
        if self._checkpoint is not None:
            cp = self._checkpoint.load()
            if cp is not None and cp.count > seq:
                # The log lost lines the checkpoint saw: go on from there, leaving a visible gap.
                seq, mac = cp.count, cp.last_mac
        return seq, mac

    def _rotate(self) -> tuple[int, os.stat_result]:
        rotated = self._rotated()
        number = rotated[-1][0] + 1 if rotated else 1
        os.rename(self._current, self.directory / f"audit-{number:06d}.jsonl")
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        fd = os.open(
            self._current,
            os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS,
            0o600,
        )
        st = os.fstat(fd)
        self._fd, self._fd_ino = fd, st.st_ino
        if self._fsync:
            fsync_dir(self.directory)
        return fd, st

    def append(self, event: AuditEvent) -> dict[str, object]:
        """Write one entry (fsync'ed, then checkpointed) and return it with its ``mac``."""
        with self._locked():
            fd, st = self._open_current()
            size = st.st_size
            tail = self._tail
            if tail is not None and tail.ino == st.st_ino and tail.size == size:
                prev_seq, prev_mac = tail.seq, tail.mac
            else:
                prev_seq, prev_mac = self._read_tail(fd, size)
            entry: dict[str, object] = {
                "seq": prev_seq + 1,
                "time": _utc_now(),
                "kid": self._kid,
                "prev": prev_mac,
                "action": event.action,
                "outcome": event.outcome,
                "actor_id": event.actor_id,
                "actor_name": event.actor_name,
                "role": event.role,
                "workspace": event.workspace,
                "target": event.target,
                "client": event.client,
                "request_id": event.request_id,
                "details": dict(event.details),
            }
            body = _canonical(entry)
            mac = hmac.new(self._key, body, hashlib.sha256).hexdigest()
            line = _splice_mac(body, mac) + b"\n"
            if size > 0 and size + len(line) > self.max_bytes:
                fd, st = self._rotate()
                size = 0
            self._tail = None
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise AuditError(f"short write to the audit log ({written} of {len(line)})")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # no partial line left behind
                raise
            if self._fsync:
                os.fsync(fd)
            self._tail = _Tail(prev_seq + 1, mac, st.st_ino, size + len(line))
            if self._checkpoint is not None:
                self._checkpoint.save(Checkpoint(count=prev_seq + 1, last_mac=mac))
        entry["mac"] = mac
        return entry

    def query(
        self,
        limit: int = 100,
        action: str | None = None,
        actor: str | None = None,
        workspace: str | None = None,
    ) -> list[dict[str, object]]:
        """Entries newest first, filtered by action, actor (name or id) and workspace. Reads
        files from the end and stops at ``limit``; a rotation while it runs may skip lines."""
        if limit < 0:
            raise ValueError("limit must be >= 0")
        found: list[dict[str, object]] = []
        if limit == 0:
            return found
        action_prefix = (
            b'{"action":' + json.dumps(action, ensure_ascii=False).encode() + b","
            if action is not None
            else None
        )
        actor_bytes = json.dumps(actor, ensure_ascii=False).encode() if actor is not None else None
        for path in reversed(self.files()):
            try:
                f = path.open("rb")
            except FileNotFoundError:
                continue
            with f:
                for raw in reverse_lines(f):
                    if action_prefix is not None and not raw.startswith(action_prefix):
                        continue
                    if actor_bytes is not None and actor_bytes not in raw:
                        continue
                    try:
                        entry = json.loads(raw)
                    except ValueError:
                        continue
                    if not isinstance(entry, dict):
                        continue
                    if actor is not None and actor not in (
                        entry.get("actor_name"),
                        entry.get("actor_id"),
                    ):
                        continue
                    if workspace is not None and entry.get("workspace") != workspace:
                        continue
                    found.append(entry)
                    if len(found) >= limit:
                        return found
        return found

    def verify(self) -> VerifyReport:
        """Verify the whole chain against the checkpoint. The checkpoint, the file list and the
        current file's length are taken under the lock; reading happens outside it."""
        with self._locked():
            cp = self._checkpoint.load() if self._checkpoint is not None else None
            paths = self.files()
            current_fd: int | None = None
            current_size = 0
            if paths and paths[-1] == self._current:
                current_fd = os.open(self._current, os.O_RDONLY | _OPEN_FLAGS)
                current_size = os.fstat(current_fd).st_size
        try:
            sources: list[_Source] = [(path.name, path.read_bytes) for path in paths]
            if current_fd is not None:
                fd = current_fd
                sources[-1] = (CURRENT_FILE, lambda: _pread_all(fd, current_size))
            return _verify(sources, self._key, cp)
        finally:
            if current_fd is not None:
                os.close(current_fd)
