"""A cheap check of the audit log's tail, for the health check (``nox-api audit verify`` and
``GET /api/audit/verify`` do the full verification).

It reads at most the last :data:`TAIL_BYTES` of the newest non-empty log file and checks, for the
complete lines there: each line's MAC under the audit key, the chain between them (``seq`` one
up, ``prev`` the MAC of the line before), and the checkpoint kept outside the log. The
checkpoint is loaded before the log is read, so lines appended meanwhile only put the log ahead
of it, which is allowed. Outcomes:

- ``fail``: the last line is incomplete, a line there does not match its MAC or another key's,
  the chain breaks, the log ends before the checkpoint (a cut tail), or the line the checkpoint
  names differs from it (a tail cut and rewritten);
- ``degraded``: the log has entries but no checkpoint, or runs further ahead of its checkpoint
  than the lines read;
- ``ok`` otherwise (an empty log with no checkpoint too).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nox_api.config import Settings
from nox_api.services.audit import KEY_FILE, AuditLog, Checkpoint, key_id
from nox_api.services.auditing import audit_key
from noxsdk.models import HealthStatus

__all__ = ["TAIL_BYTES", "TailReport", "check_audit_tail"]

TAIL_BYTES = 64 * 1024
_MAX_TAIL_BYTES = 1024 * 1024  # one line may be long (8 KiB of details, 4 KiB fields): grow to this
# Each line is canonical JSON with ,"mac":"<64 hex>" spliced in before its final "}".
_MAC_PREFIX = b',"mac":"'
_MAC_SUFFIX = b'"}'
_MAC_TAIL = len(_MAC_PREFIX) + 64 + len(_MAC_SUFFIX)


@dataclass(frozen=True, slots=True)
class TailReport:
    status: HealthStatus
    detail: str
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Line:
    seq: int
    prev: str
    kid: str
    mac: str


def _read_tail(path: Path) -> tuple[list[bytes], bytes]:
    """The complete lines in the last bytes of ``path`` and what follows the last newline."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        window = TAIL_BYTES
        while True:
            start = max(0, size - window)
            f.seek(start)
            lines = f.read(size - start).split(b"\n")
            rest = lines.pop()
            if start > 0:
                lines = lines[1:]  # the first may have begun before the window
            if lines or start == 0 or window >= _MAX_TAIL_BYTES:
                return lines, rest
            window *= 4


def _parse(raw: bytes, key: bytes) -> _Line | None:
    """The line's fields when its MAC verifies under ``key``; None otherwise."""
    if len(raw) <= _MAC_TAIL or raw[-_MAC_TAIL : -_MAC_TAIL + len(_MAC_PREFIX)] != _MAC_PREFIX:
        return None
    if raw[-2:] != _MAC_SUFFIX:
        return None
    mac = raw[-66:-2]
    body = raw[:-_MAC_TAIL] + b"}"
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).hexdigest().encode(), mac):
        return None
    try:
        entry = json.loads(body)
        return _Line(int(entry["seq"]), str(entry["prev"]), str(entry["kid"]), mac.decode())
    except (ValueError, KeyError, TypeError):
        return None


def _key(settings: Settings) -> bytes | None:
    """The audit key, without creating one (a health check never writes)."""
    if settings.audit_key is None and not (settings.data_path / KEY_FILE).is_file():
        return None
    return audit_key(settings)


def _newest_lines(audit_log: AuditLog) -> tuple[str | None, list[bytes], bytes]:
    for path in reversed(audit_log.files()):
        try:
            lines, rest = _read_tail(path)
        except FileNotFoundError:  # rotated away meanwhile
            continue
        if lines or rest:
            return path.name, lines, rest
    return None, [], b""


def _against_checkpoint(cp: Checkpoint | None, lines: list[_Line]) -> TailReport:
    last = lines[-1]
    extra: dict[str, object] = {"entries": last.seq, "checkpoint": cp.count if cp else None}
    if cp is None:
        return TailReport(
            HealthStatus.DEGRADED,
            f"{last.seq} entries but no checkpoint outside the log: a cut tail would go unseen",
            extra,
        )
    if cp.count > last.seq:
        return TailReport(
            HealthStatus.FAIL,
            f"truncated: the checkpoint records {cp.count} entries, the log ends at seq "
            f"{last.seq}; run `nox-api audit verify`",
            extra,
        )
    named = next((line for line in lines if line.seq == cp.count), None)
    if named is None:
        return TailReport(
            HealthStatus.DEGRADED,
            f"the log ({last.seq} entries) is {last.seq - cp.count} entries ahead of its "
            "checkpoint, beyond the lines checked: is the checkpoint being stored?",
            extra,
        )
    if named.mac != cp.last_mac:
        return TailReport(
            HealthStatus.FAIL,
            f"truncated: the line with seq {cp.count} differs from the checkpoint's: the tail "
            "was cut and rewritten; run `nox-api audit verify`",
            extra,
        )
    return TailReport(
        HealthStatus.OK,
        f"the last {len(lines)} of {last.seq} entries verify and match the checkpoint",
        extra,
    )


def check_audit_tail(audit_log: AuditLog, settings: Settings) -> TailReport:
    key = _key(settings)
    if key is None:
        return TailReport(HealthStatus.FAIL, "the audit key is missing (audit.key, NOX_AUDIT_KEY)")
    store = audit_log.checkpoint_store
    cp = store.load() if store is not None else None  # before the log: see the module doc
    name, raw_lines, rest = _newest_lines(audit_log)
    if rest:
        return TailReport(
            HealthStatus.FAIL,
            f"truncated: the last line of {name} is incomplete; run `nox-api audit verify`",
        )
    if not raw_lines:
        if cp is not None and cp.count > 0:
            return TailReport(
                HealthStatus.FAIL,
                f"the audit log is empty but its checkpoint records {cp.count} entries: it was "
                "deleted or cut",
                {"entries": 0, "checkpoint": cp.count},
            )
        return TailReport(HealthStatus.OK, "the audit log is empty", {"entries": 0})
    checked = _verify_lines(raw_lines, key, name)
    if isinstance(checked, TailReport):
        return checked
    return _against_checkpoint(cp, checked)


def _verify_lines(raw_lines: list[bytes], key: bytes, name: str | None) -> list[_Line] | TailReport:
    """The lines parsed, when each verifies and continues the one before; else the failure."""
    kid = key_id(key)
    lines: list[_Line] = []
    for number, raw in enumerate(raw_lines, start=len(raw_lines) * -1):
        line = _parse(raw, key)
        where = "the last line" if number == -1 else f"line {-number} from the end"
        if line is None:
            return TailReport(
                HealthStatus.FAIL,
                f"edited: {where} of {name} does not match its MAC; run `nox-api audit verify`",
            )
        if line.kid != kid:
            return TailReport(
                HealthStatus.FAIL, f"wrong key: {where} of {name} was written with another key"
            )
        if lines and (line.seq != lines[-1].seq + 1 or line.prev != lines[-1].mac):
            return TailReport(
                HealthStatus.FAIL,
                f"the chain breaks at {where} of {name} (seq {line.seq} after "
                f"{lines[-1].seq}); run `nox-api audit verify`",
            )
        lines.append(line)
    return lines
