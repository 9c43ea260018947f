"""Benchmark of encrypted backups (``nox_api.services.backups``): create and restore.

``.venv/bin/python bench/backup.py [--mib 1024] [--large-share 0.75] [--small-kib 16]`` fills a
temp data folder with ``--mib`` MiB of workspace data, mixed: a few large files of random bytes
(incompressible; ``--large-share`` of the total) and many small text files of ``--small-kib``
KiB, then times ``BackupService.create`` and ``BackupService.restore`` (fsync'ed, real AES and
zstd, the offline path of ``nox-api backup``). The restore is timed whole (it includes the
automatic ``pre-restore`` backup of the state it replaces and the removal of that state) and
as its own part: unpacking and checking the backup (beside the pre-restore backup, which runs
in a thread of its own at the same time) and swapping it in. ``measure`` is for reuse by
``bench/run.py``. Target: >= 100 MB/s (10^6 bytes) of workspace data for the backup and for the
whole restore (exit 1 below it).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nox_api.config import load_settings
from nox_api.services import backups as backups_mod
from nox_api.services.auditing import Auditor, Caller, open_audit_log
from nox_api.services.backups import BackupService
from nox_api.storage.db import Database

TARGET_MB_S = 100.0
MIB = 1 << 20
KEY = "5e" * 32
_WORDS = [
    *("def", "return", "import", "class", "self", "value", "print", "for", "while", "with"),
    *("open", "read", "write", "data", "result", "error", "None", "True", "False", "lambda"),
    *("yield", "async", "await", "try", "except", "raise", "from", "as", "in", "is", "not"),
]


@dataclass(frozen=True)
class Figures:
    data_bytes: int
    files: int
    backup_bytes: int
    backup_s: float
    restore_s: float
    restore_unpack_s: float

    @property
    def backup_mb_s(self) -> float:
        return self.data_bytes / self.backup_s / 1e6

    @property
    def restore_mb_s(self) -> float:
        return self.data_bytes / self.restore_s / 1e6

    @property
    def restore_unpack_mb_s(self) -> float:
        return self.data_bytes / self.restore_unpack_s / 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "backup_mb_s": round(self.backup_mb_s, 1),
            "restore_mb_s": round(self.restore_mb_s, 1),
            "restore_unpack_mb_s": round(self.restore_unpack_mb_s, 1),
        }


def _fill(workspace: Path, total: int, large_share: float, small_kib: int) -> int:
    """Write ``total`` bytes of workspace data; return the number of files."""
    rng = random.Random(7)
    large_total = int(total * large_share)
    large_count = 4
    files = 0
    for i in range(large_count):
        path = workspace / "datasets" / f"blob-{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            left = large_total // large_count
            while left > 0:
                step = min(left, 8 * MIB)
                f.write(os.urandom(step))
                left -= step
        files += 1
    small = small_kib * 1024
    text = " ".join(rng.choice(_WORDS) for _ in range(small)).encode()
    count = (total - large_total) // small
    for i in range(count):
        folder = workspace / "src" / f"pkg{i // 500:03d}"
        if i % 500 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        offset = rng.randrange(0, len(text) - small)
        (folder / f"mod{i:05d}.py").write_bytes(text[offset : offset + small])
        files += 1
    return files


def measure(total_mib: int = 1024, large_share: float = 0.75, small_kib: int = 16) -> Figures:
    """Back up and restore ``total_mib`` MiB of workspace data once; the figures."""
    root = Path(tempfile.mkdtemp(prefix="nox-backup-bench-"))
    try:
        settings = load_settings(data_dir=root / "data", backup_key=KEY, sandbox_backend="unsafe")
        files = _fill(settings.workspaces_dir / "default", total_mib * MIB, large_share, small_kib)
        data_bytes = sum(
            p.stat().st_size for p in settings.workspaces_dir.rglob("*") if p.is_file()
        )
        db = Database(settings.sqlalchemy_url)
        db.migrate()
        unpack_s: list[float] = []
        real_unpack = BackupService._unpack

        def timed_unpack(self: BackupService, *args: Any) -> dict[str, int]:
            start = time.perf_counter()
            try:
                return real_unpack(self, *args)
            finally:
                unpack_s.append(time.perf_counter() - start)

        real_swap = BackupService._swap

        def timed_swap(self: BackupService, *args: Any) -> None:
            start = time.perf_counter()
            try:
                real_swap(self, *args)
            finally:
                unpack_s.append(time.perf_counter() - start)

        try:
            with open_audit_log(settings, db) as audit_log:
                service = BackupService(settings, db, Auditor(audit_log))
                caller = Caller()
                start = time.perf_counter()
                info = service.create("bench", caller)
                backup_s = time.perf_counter() - start
                BackupService._unpack = timed_unpack  # type: ignore[method-assign]
                BackupService._swap = timed_swap  # type: ignore[method-assign]
                try:
                    start = time.perf_counter()
                    service.restore("bench", caller)
                    restore_s = time.perf_counter() - start
                finally:
                    BackupService._unpack = real_unpack  # type: ignore[method-assign]
                    BackupService._swap = real_swap  # type: ignore[method-assign]
        finally:
            db.close()
        return Figures(data_bytes, files, info.size, backup_s, restore_s, sum(unpack_s))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB of workspace data")
    parser.add_argument("--large-share", type=float, default=0.75, help="share in large files")
    parser.add_argument("--small-kib", type=int, default=16, help="size of each small file")
    args = parser.parse_args(argv)
    f = measure(args.mib, args.large_share, args.small_kib)
    print(
        f"data: {f.data_bytes / MIB:,.0f} MiB in {f.files:,} files; backup file "
        f"{f.backup_bytes / MIB:,.0f} MiB ({backups_mod.BACKUP_SUFFIX})"
    )
    print(f"backup:  {f.backup_s:6.2f} s = {f.backup_mb_s:6.0f} MB/s")
    print(
        f"restore: {f.restore_s:6.2f} s = {f.restore_mb_s:6.0f} MB/s whole (with its "
        f"pre-restore backup); {f.restore_unpack_s:6.2f} s = {f.restore_unpack_mb_s:6.0f} MB/s "
        "unpacking and checking (beside the pre-restore backup) and swapping"
    )
    low = [
        name
        for name, value in (("backup", f.backup_mb_s), ("restore", f.restore_mb_s))
        if value < TARGET_MB_S
    ]
    if low:
        print(f"below the target of {TARGET_MB_S:.0f} MB/s: {', '.join(low)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
