"""Uploads and downloads stream (a 64 MiB round trip leaves the client's memory flat), bodies
from paths and file objects, progress, partial downloads, and the live log stream."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import time
from pathlib import Path

import psutil
import pytest

from noxsdk import NoxClient, NoxConnectionError, NoxError, RetryEvent

from ._scripted_http import Answer, scripted_server
from .conftest import Server

pytestmark = pytest.mark.sandbox

MIB = 1024 * 1024
BIG_MIB = 64


def _big_file(path: Path) -> str:
    """A file of BIG_MIB MiB of random bytes, written a MiB at a time; its SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(BIG_MIB):
            block = os.urandom(MIB)
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def test_a_64_mib_round_trip_keeps_memory_flat(server: Server, tmp_path: Path) -> None:
    source, target = tmp_path / "big.bin", tmp_path / "back.bin"
    expected = _big_file(source)
    process = psutil.Process()
    peak = 0
    reports: list[tuple[int, int | None]] = []

    def progress(done: int, total: int | None) -> None:
        nonlocal peak
        reports.append((done, total))
        peak = max(peak, process.memory_info().rss)

    with server.client() as client:
        client.write_file("warm-up.bin", b"x" * MIB)  # connections and buffers made once
        client.download("warm-up.bin", tmp_path / "warm-up.bin")
        baseline = process.memory_info().rss

        info = client.write_file("big/big.bin", source, progress=progress)
        assert (info.size, info.sha256) == (BIG_MIB * MIB, expected)
        assert reports[0] == (0, BIG_MIB * MIB)
        assert reports[-1] == (BIG_MIB * MIB, BIG_MIB * MIB)
        uploaded_peak, reports[:] = peak, []

        written = client.download("big/big.bin", target, progress=progress)
        assert written == BIG_MIB * MIB
        assert reports[-1] == (BIG_MIB * MIB, BIG_MIB * MIB)
        client.delete_file("big", recursive=True)

    assert _sha256(target) == expected
    growth = (max(uploaded_peak, peak) - baseline) / MIB
    assert growth < 24, f"the client grew by {growth:.0f} MiB moving a {BIG_MIB} MiB file"


def test_sources_and_destinations_of_the_sync_client(server: Server, tmp_path: Path) -> None:
    local = tmp_path / "local name.txt"
    local.write_bytes(b"from a path\n")
    with server.client() as client:
        assert client.put(local).path == "local name.txt"  # the target defaults to the name
        with local.open("rb") as handle:
            handle.seek(5)  # a file object is sent from where it stands
            assert client.write_file("dir/part.txt", handle).size == len(b"a path\n")
        sink = io.BytesIO()
        assert client.download("dir/part.txt", sink) == 7
        assert sink.getvalue() == b"a path\n"
        chunks = list(client.iter_file("local name.txt", chunk_size=4))
        assert chunks == [b"from", b" a p", b"ath\n"]
        client.delete_file("dir", recursive=True)
        client.delete_file("local name.txt")
    with pytest.raises(TypeError, match="not a str"):
        client.write_file("x", "text is not a path")  # type: ignore[arg-type]


def test_sources_and_destinations_of_the_async_client(server: Server, tmp_path: Path) -> None:
    local = tmp_path / "async.bin"
    local.write_bytes(bytes(range(256)) * 1024)
    target = tmp_path / "copy.bin"

    async def main() -> None:
        async with server.aclient() as client:
            put = await client.put(local, "async/put.bin")
            assert put.size == 256 * 1024
            with local.open("rb") as handle:
                await client.write_file("async/file.bin", handle)
            seen: list[int] = []
            await client.download("async/file.bin", target, progress=lambda d, t: seen.append(d))
            assert seen[-1] == 256 * 1024
            parts = [chunk async for chunk in client.iter_file("async/put.bin")]
            assert b"".join(parts) == local.read_bytes()
            await client.delete_file("async", recursive=True)

    asyncio.run(main())
    assert target.read_bytes() == local.read_bytes()


def test_a_failed_download_leaves_no_file(server: Server, tmp_path: Path) -> None:
    target = tmp_path / "never.txt"
    with server.client() as client, pytest.raises(NoxError):
        client.download("no/such/file", target)
    cut_short = pytest.raises(NoxConnectionError, match="broke during GET /api/files/cut")
    with scripted_server() as scripted, NoxClient(scripted.url, "t") as client, cut_short:
        scripted.script(Answer(200, b"only ten b", length=100))
        client.download("cut", target)
    assert list(tmp_path.iterdir()) == []


def test_an_upload_is_resent_only_when_it_can_be(tmp_path: Path) -> None:
    """A dropped connection retries a PUT of bytes, a path or a seekable file; a pipe cannot
    be read twice, so its upload fails at once."""
    events: list[RetryEvent] = []
    saved = {
        "path": "f",
        "name": "f",
        "type": "file",
        "size": 3,
        "modified": "2026-01-01T00:00:00Z",
    }
    with (
        scripted_server() as scripted,
        NoxClient(scripted.url, "t", on_retry=events.append, backoff_s=0.01) as client,
    ):
        scripted.script(Answer(drop=True), Answer.json(201, saved))
        assert client.write_file("f", b"abc").size == 3
        assert [s.body_bytes for s in scripted.seen] == [0, 3]
        assert len(events) == 1

        read_end, write_end = os.pipe()
        with os.fdopen(write_end, "wb") as writer:
            writer.write(b"abc")
        events.clear()
        scripted.script(Answer(drop=True), Answer.json(201, saved))
        with os.fdopen(read_end, "rb") as pipe, pytest.raises(NoxConnectionError):
            client.write_file("f", pipe)
        assert events == []
        assert len(scripted.seen) == 1
        assert scripted.seen[0].headers.get("Transfer-Encoding") == "chunked"  # size unknown


def _log_lines_sync(server: Server) -> list[str]:
    stop = threading.Event()

    def poke() -> None:  # requests that the server logs while the stream is open
        with server.client() as other:
            while not stop.wait(0.2):
                other.me()

    poker = threading.Thread(target=poke)
    lines: list[str] = []
    with server.client() as client:
        stream = client.stream_logs(duration_s=10)
        poker.start()
        try:
            for line in stream:
                lines.append(line)
                if "/api/me" in line:
                    break
        finally:
            stop.set()
            poker.join(5)
            stream.close()  # type: ignore[attr-defined]
    return lines


def test_the_log_stream_of_the_sync_client(server: Server) -> None:
    started = time.monotonic()
    lines = _log_lines_sync(server)
    assert "/api/me" in lines[-1]
    assert time.monotonic() - started < 8
    assert all(line.startswith("{") for line in lines)


def test_the_log_stream_of_the_async_client(server: Server) -> None:
    async def main() -> list[str]:
        async with server.aclient() as client:

            async def poke() -> None:
                while True:
                    await asyncio.sleep(0.2)
                    await client.me()

            poker = asyncio.create_task(poke())
            lines: list[str] = []
            try:
                async for line in client.stream_logs(duration_s=10):
                    lines.append(line)
                    if "/api/me" in line:
                        break
            finally:
                poker.cancel()
            return lines

    lines = asyncio.run(asyncio.wait_for(main(), timeout=10))
    assert "/api/me" in lines[-1]


def test_a_log_stream_that_ends_ends_the_iteration(server: Server) -> None:
    started = time.monotonic()
    with server.client() as client:
        list(client.stream_logs(duration_s=0.5))
    assert time.monotonic() - started < 5
