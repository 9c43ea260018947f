"""Writing through aligned buffers past the page cache (O_DIRECT), and the fall-backs where a
file system refuses it: at open (tmpfs) or at the first write. Same bytes every way."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any

import pytest

from nox_api.services import direct_io
from nox_api.services.direct_io import ALIGN, AlignedPool, DirectFile, DirectWriter, open_new

SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 17, (1 << 20) + 5]


def _write(path: Path, data: bytes, pieces: int, direct: bool = True) -> bool:
    fd, used = open_new(str(path), direct=direct)
    try:
        writer = DirectWriter(fd, used, buffer_bytes=2 * ALIGN)
        step = max(1, len(data) // pieces)
        for start in range(0, len(data), step):
            assert writer.write(data[start : start + step]) == len(data[start : start + step])
        writer.close()
        writer.close()  # idempotent
    finally:
        os.close(fd)
    return used


def _direct_here(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(folder / "probe")
    return True


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_what_is_written_is_what_is_read_back(tmp_path: Path, size: int, pieces: int) -> None:
    data = os.urandom(size)
    used = _write(tmp_path / "f", data, pieces)
    assert used == _direct_here(tmp_path)
    assert (tmp_path / "f").read_bytes() == data
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("size", SIZES)
def test_without_o_direct_the_same_bytes_go_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    monkeypatch.setattr(direct_io, "_DIRECT", 0)  # a platform without O_DIRECT
    data = os.urandom(size)
    assert _write(tmp_path / "f", data, 3) is False
    assert (tmp_path / "f").read_bytes() == data
    assert _write(tmp_path / "g", data, 3, direct=False) is False
    assert (tmp_path / "g").read_bytes() == data


def test_a_file_system_refusing_direct_writes_gets_buffered_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_DIRECT taken at open, EINVAL at the first write: the flag is dropped, the write
    retried through the page cache, the padding cut as it would be."""
    real_write = os.write
    calls: list[int] = []

    def refusing(fd: int, data: Any) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", refusing)
    fd, _ = open_new(str(tmp_path / "f"))  # with O_DIRECT where this file system takes it
    data = os.urandom(3 * ALIGN + 5)
    try:
        writer = DirectWriter(fd, True, buffer_bytes=2 * ALIGN)
        writer.write(data)
        writer.close()
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    # refused, the same piece again, then the rest as it is: no padding without O_DIRECT
    assert calls == [2 * ALIGN, 2 * ALIGN, ALIGN + 5]
    assert (tmp_path / "f").read_bytes() == data


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "write", full)
    fd, used = open_new(str(tmp_path / "f"))
    try:
        writer = DirectWriter(fd, used, buffer_bytes=ALIGN)
        with pytest.raises(OSError, match="No space left"):
            writer.write(bytes(ALIGN))
    finally:
        os.close(fd)


def test_a_new_file_never_replaces_an_entry_nor_follows_a_link(tmp_path: Path) -> None:
    (tmp_path / "there").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        open_new(str(tmp_path / "there"))
    with pytest.raises(FileExistsError):
        open_new(str(tmp_path / "link"))
    assert not (tmp_path / "elsewhere").exists()


def test_only_the_last_piece_of_a_direct_file_may_be_unaligned(tmp_path: Path) -> None:
    fd, used = open_new(str(tmp_path / "f"))
    pool = AlignedPool(1, 2 * ALIGN)
    buffer = pool.take()
    try:
        buffer[:10] = b"0123456789"
        out = DirectFile(fd, used)
        out.write(buffer, 10)
        if used:
            with pytest.raises(ValueError, match="only the last piece"):
                out.write(buffer, ALIGN)
        out.finish()
    finally:
        pool.give(buffer)
        pool.close()
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789"


def test_the_pool_hands_out_aligned_buffers_and_bounds_them() -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        AlignedPool(1, ALIGN + 1)
    pool = AlignedPool(2, ALIGN)
    first, second = pool.take(), pool.take()
    assert first is not second
    assert len(first) == ALIGN
    pool.give(first)
    assert pool.take() is first  # reused, not made anew
    pool.give(first)
    pool.give(second)
    pool.close()
