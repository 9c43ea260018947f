"""Uploads under way reserve their bytes against the workspace's storage quota and daily upload
quota, so that parallel uploads cannot pass a quota together (each alone would fit).

An upload reserves its declared size (``Content-Length``) before it writes a byte, or, when
the size is unknown, reserves as it streams: each write first reserves the bytes it adds
(:meth:`Reservation.grow`), refused with the quota's error once the quota, less what the other
uploads hold, is used up. :meth:`Reservation.release` gives the bytes back when the upload
ends; a landed upload's bytes are counted from then on as stored (and, once recorded, as
uploaded today) in place of reserved.

Per workspace, under one lock: what was stored at the last count (the folder walked when an
upload starts), what landed since, and what uploads under way hold. A new upload walks the
folder afresh, so runs' own changes count from then on; the walk and the reservation happen
under the lock, and an upload gives its bytes back only after its file is in place and its
bytes recorded, so a count sees each upload's bytes once or twice, never not at all.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from nox_api.errors import NoxError
from nox_api.services.quotas import QuotaService, UploadRoom, directory_bytes

__all__ = ["Reservation", "UploadQuota"]

MIB = 1 << 20


@dataclass
class _Ledger:
    """One workspace's counts; ``lock`` guards every field."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    stored: int = 0  # bytes in the folder at the last walk
    uploaded: int = 0  # bytes uploaded today at that time (the usage table)
    landed_stored: int = 0  # net bytes landed since (size less the file each replaced)
    landed_uploaded: int = 0  # bytes landed since
    reserved: int = 0  # bytes held by uploads under way
    active: int = 0  # uploads under way


class Reservation:
    """The bytes one upload holds. ``limit``: the most it may write, as the quotas stood when
    it started (a PayloadTooLarge past it is the quota's doing when below the server's cap)."""

    def __init__(
        self, owner: UploadQuota, workspace: str, ledger: _Ledger, credit: int, room: UploadRoom
    ) -> None:
        self._owner = owner
        self._workspace = workspace
        self._ledger = ledger
        self._credit = credit  # bytes of the file the upload replaces, freed when it lands
        self.room = room
        self.limit = room.bytes
        self.held = 0
        self._released = False

    def grow(self, size: int) -> None:
        """The upload is about to be ``size`` bytes: hold them, or raise the quota's error."""
        if size <= self.held:
            return
        with self._ledger.lock:
            if self._released:
                raise NoxError("the upload's reservation was released")
            self._owner._hold(self._workspace, self._ledger, self, size)

    def refused(self, size: int | None) -> NoxError:
        """The quota's error for an upload of ``size`` bytes, as the quotas stood at the start."""
        return self._owner.quotas.upload_refused(self._workspace, self.room, size)

    def release(self, landed: bool = False) -> None:
        """Give the bytes back; ``landed``: the file is in place and recorded. Idempotent."""
        ledger = self._ledger
        with ledger.lock:
            if self._released:
                return
            self._released = True
            ledger.reserved -= self.held
            if landed:
                ledger.landed_stored += self.held - self._credit
                ledger.landed_uploaded += self.held
            ledger.active -= 1
            self.held = 0
        self._owner._forget_idle(self._workspace, ledger)


class UploadQuota:
    """The reservations of every workspace's uploads under way (one server)."""

    def __init__(self, quotas: QuotaService) -> None:
        self.quotas = quotas
        self._lock = threading.Lock()  # guards _ledgers
        self._ledgers: dict[str, _Ledger] = {}

    def reserve(
        self, workspace: str, root: Path, *, size: int | None, replaced: int = 0
    ) -> Reservation:
        """Start an upload into ``workspace`` (its folder ``root``) of ``size`` bytes (None:
        unknown) that replaces a file of ``replaced`` bytes. Raises the quota's error when
        ``size`` does not fit, or when nothing is left at all."""
        with self._lock:
            ledger = self._ledgers.setdefault(workspace, _Ledger())
            ledger.active += 1  # under this lock: the ledger cannot be forgotten meanwhile
        try:
            with ledger.lock:
                ledger.stored = directory_bytes(root)
                ledger.uploaded = self.quotas.usage(workspace).upload_bytes
                ledger.landed_stored = ledger.landed_uploaded = 0
                room = self._room(workspace, ledger, replaced, 0)
                reservation = Reservation(self, workspace, ledger, replaced, room)
                if room.storage_left <= 0 or room.upload_left <= 0:
                    raise self.quotas.upload_refused(workspace, room, None)
                if size:
                    self._hold(workspace, ledger, reservation, size)
        except BaseException:
            with ledger.lock:
                ledger.active -= 1
            self._forget_idle(workspace, ledger)
            raise
        return reservation

    def _room(self, workspace: str, ledger: _Ledger, credit: int, held: int) -> UploadRoom:
        """What an upload holding ``held`` bytes (and freeing ``credit`` when it lands) may
        still add; the caller holds ``ledger.lock``."""
        quota = self.quotas.quota(workspace)
        others = ledger.reserved - held
        stored = ledger.stored + ledger.landed_stored + others - credit
        uploaded = ledger.uploaded + ledger.landed_uploaded + others
        return UploadRoom(
            storage_left=quota.storage_mib * MIB - stored,
            upload_left=quota.upload_mib_per_day * MIB - uploaded,
        )

    def _hold(self, workspace: str, ledger: _Ledger, reservation: Reservation, size: int) -> None:
        """Hold ``size`` bytes in all for ``reservation``; the caller holds ``ledger.lock``."""
        room = self._room(workspace, ledger, reservation._credit, reservation.held)
        if size > room.bytes:
            raise self.quotas.upload_refused(workspace, room, size)
        ledger.reserved += size - reservation.held
        reservation.held = size

    def _forget_idle(self, workspace: str, ledger: _Ledger) -> None:
        """Drop the ledger of a workspace without uploads under way (the next one walks)."""
        with self._lock, ledger.lock:
            if ledger.active == 0 and self._ledgers.get(workspace) is ledger:
                del self._ledgers[workspace]

    def held(self, workspace: str) -> int:
        """Bytes the uploads under way into ``workspace`` hold (for tests and metrics)."""
        with self._lock:
            ledger = self._ledgers.get(workspace)
        if ledger is None:
            return 0
        with ledger.lock:
            return ledger.reserved
