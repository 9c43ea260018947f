"""The tamper-evident audit log: format, chain, tampering reports, rotation, concurrency, keys."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import multiprocessing
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nox_api.services import audit
from nox_api.services.audit import (
    GENESIS_MAC,
    AuditError,
    AuditEvent,
    AuditLog,
    Checkpoint,
    FileCheckpointStore,
    MemoryCheckpointStore,
    key_id,
    load_or_create_key,
    verify_files,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
SECRET_NAME_RE = re.compile(r"(?i)token|secret|passw|^key$|_key$|^apikey$")


def event(i: int = 0, action: str = "run", actor: str = "alice", **extra: object) -> AuditEvent:
    fields: dict[str, object] = {
        "actor_id": f"id-{actor}",
        "actor_name": actor,
        "role": "runner",
        "workspace": "default",
        "target": f"target-{i}",
        "client": "127.0.0.1",
        "request_id": f"req-{i}",
        "details": {"sha256": hashlib.sha256(str(i).encode()).hexdigest(), "n": i},
    }
    fields.update(extra)
    return AuditEvent(action, "ok", **fields)  # type: ignore[arg-type]


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog(tmp_path / "audit", KEY, MemoryCheckpointStore(), fsync=False) as opened:
        yield opened


def fill(log: AuditLog, n: int, start: int = 0) -> list[dict[str, object]]:
    return [log.append(event(start + i)) for i in range(n)]


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def all_entries(log: AuditLog) -> list[dict[str, object]]:
    return [json.loads(line) for path in log.files() for line in read_lines(path)]


# --- format -----------------------------------------------------------------------------------


def test_all_is_sorted() -> None:
    assert audit.__all__ == sorted(audit.__all__)
    assert all(hasattr(audit, name) for name in audit.__all__)


def test_fresh_log_verifies(log: AuditLog) -> None:
    assert log.verify().ok
    assert log.verify().entries == 0
    fill(log, 20)
    report = log.verify()
    assert report == audit.VerifyReport(ok=True, entries=20)
    assert verify_files(log.files(), KEY, None).ok


def test_missing_log_without_checkpoint_is_ok(tmp_path: Path) -> None:
    assert verify_files([], KEY, None) == audit.VerifyReport(ok=True, entries=0)


def test_line_format_is_canonical_json_with_spliced_mac(log: AuditLog) -> None:
    first, second = fill(log, 2)
    raw = read_lines(log.files()[0])
    for entry, line in zip((first, second), raw, strict=True):
        assert line.endswith(b"\n")
        without_mac = {k: v for k, v in entry.items() if k != "mac"}
        body = json.dumps(
            without_mac, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
        mac = hmac.new(KEY, body, hashlib.sha256).hexdigest()
        assert entry["mac"] == mac
        assert line == body[:-1] + b',"mac":"' + mac.encode() + b'"}\n'
        assert json.loads(line) == entry
        assert TIME_RE.fullmatch(str(entry["time"]))
        assert entry["kid"] == key_id(KEY)
    assert first["seq"] == 1
    assert first["prev"] == GENESIS_MAC
    assert second["seq"] == 2
    assert second["prev"] == first["mac"]
    assert key_id(KEY) == hmac.new(KEY, b"nox-audit-key-id", hashlib.sha256).hexdigest()[:16]


def test_append_with_fsync_and_file_checkpoint(tmp_path: Path) -> None:
    store = FileCheckpointStore(tmp_path / "checkpoint.json")
    with AuditLog(tmp_path / "audit", KEY, store) as log:
        entries = fill(log, 5)
        assert store.load() == Checkpoint(5, str(entries[-1]["mac"]))
        assert log.verify().ok
        assert stat.S_IMODE((tmp_path / "audit").stat().st_mode) == 0o700
        for name in ("audit.jsonl", "audit.lock"):
            assert stat.S_IMODE((tmp_path / "audit" / name).stat().st_mode) == 0o600
    assert verify_files(log.files(), KEY, store.load()).ok


def test_new_instance_continues_the_chain(tmp_path: Path) -> None:
    with AuditLog(tmp_path, KEY, fsync=False) as first:
        fill(first, 3)
    with AuditLog(tmp_path, KEY, fsync=False) as second:
        entry = second.append(event(3))
        assert entry["seq"] == 4
        assert second.verify() == audit.VerifyReport(ok=True, entries=4)


# --- tampering --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [(b'"target":"target-9"', b'"target":"target-8"'), (b'"seq":10,', b'"seq":19,')],
)
def test_changed_byte_is_edited(log: AuditLog, old: bytes, new: bytes) -> None:
    fill(log, 20)
    path = log.files()[0]
    lines = read_lines(path)
    assert old in lines[9]
    lines[9] = lines[9].replace(old, new)
    write_lines(path, lines)
    report = log.verify()
    assert not report.ok
    assert report.first_bad_line == 10
    assert report.entries == 9
    assert report.file == "audit.jsonl"
    assert report.reason is not None
    assert report.reason.startswith("edited: ")


def test_changed_mac_byte_is_edited(log: AuditLog) -> None:
    fill(log, 5)
    path = log.files()[0]
    data = bytearray(path.read_bytes())
    end_of_line_3 = [i for i, b in enumerate(data) if b == ord("\n")][2]
    data[end_of_line_3 - 5] ^= 0x01  # inside the hex MAC
    path.write_bytes(bytes(data))
    report = log.verify()
    assert (report.first_bad_line, report.entries) == (3, 2)
    assert str(report.reason).startswith("edited: ")


def reformat_spaces(line: bytes) -> bytes:
    return json.dumps(json.loads(line), ensure_ascii=False).encode() + b"\n"


def reformat_sorted(line: bytes) -> bytes:
    obj = json.loads(line)
    return (
        json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    )


def reformat_ascii(line: bytes) -> bytes:
    return json.dumps(json.loads(line), separators=(",", ":")).encode() + b"\n"


@pytest.mark.parametrize("reformat", [reformat_spaces, reformat_sorted, reformat_ascii])
def test_reformatted_line_is_edited(tmp_path: Path, reformat: object) -> None:
    assert callable(reformat)
    with AuditLog(tmp_path, KEY, fsync=False) as log:
        for i in range(6):
            log.append(event(i, actor="zoë"))
        path = log.files()[0]
        lines = read_lines(path)
        changed = reformat(lines[3])
        assert changed != lines[3]
        assert json.loads(changed) == json.loads(lines[3])  # same content
        lines[3] = changed
        write_lines(path, lines)
        report = log.verify()
    assert (report.ok, report.first_bad_line, report.entries) == (False, 4, 3)
    assert str(report.reason).startswith("edited: ")
    assert "canonical" in str(report.reason)


def test_garbage_line_is_edited(log: AuditLog) -> None:
    fill(log, 4)
    path = log.files()[0]
    lines = read_lines(path)
    lines.insert(2, b"not json at all\n")
    write_lines(path, lines)
    report = log.verify()
    assert report.first_bad_line == 3
    assert str(report.reason).startswith("edited: ")


@pytest.mark.parametrize("index", [0, 9, 18])
def test_deleted_line_is_removed(log: AuditLog, index: int) -> None:
    fill(log, 20)
    path = log.files()[0]
    lines = read_lines(path)
    del lines[index]
    write_lines(path, lines)
    report = log.verify()
    assert (report.ok, report.first_bad_line, report.entries) == (False, index + 1, index)
    assert str(report.reason).startswith("removed: ")
    assert report.file == "audit.jsonl"


def test_swapped_adjacent_lines_are_reordered(log: AuditLog) -> None:
    fill(log, 20)
    path = log.files()[0]
    lines = read_lines(path)
    lines[9], lines[10] = lines[10], lines[9]
    write_lines(path, lines)
    report = log.verify()
    assert (report.ok, report.first_bad_line, report.entries) == (False, 10, 9)
    assert str(report.reason).startswith("reordered: ")


def test_swapped_distant_lines_are_reordered(log: AuditLog) -> None:
    fill(log, 20)
    path = log.files()[0]
    lines = read_lines(path)
    lines[4], lines[15] = lines[15], lines[4]
    write_lines(path, lines)
    report = log.verify()
    assert report.first_bad_line == 5
    assert str(report.reason).startswith("reordered: ")


def test_repeated_line_is_reordered(log: AuditLog) -> None:
    fill(log, 10)
    path = log.files()[0]
    lines = read_lines(path)
    lines.insert(5, lines[4])
    write_lines(path, lines)
    report = log.verify()
    assert (report.first_bad_line, report.entries) == (6, 5)
    assert str(report.reason).startswith("reordered: ")


def test_cut_tail_with_checkpoint_is_truncated(log: AuditLog) -> None:
    fill(log, 20)
    path = log.files()[0]
    write_lines(path, read_lines(path)[:-3])
    report = log.verify()
    assert (report.ok, report.entries, report.first_bad_line) == (False, 17, 18)
    assert str(report.reason).startswith("truncated: ")
    assert report.file == "audit.jsonl"
    # Without a checkpoint a cut tail cannot be seen: that is what the checkpoint is for.
    assert verify_files(log.files(), KEY, None) == audit.VerifyReport(ok=True, entries=17)


def test_deleted_log_with_checkpoint_is_truncated(log: AuditLog) -> None:
    fill(log, 5)
    log.files()[0].unlink()
    report = log.verify()
    assert (report.ok, report.entries, report.first_bad_line) == (False, 0, 1)
    assert str(report.reason).startswith("truncated: ")


def test_checkpoint_mac_mismatch_is_truncated(log: AuditLog) -> None:
    entries = fill(log, 10)
    assert verify_files(log.files(), KEY, Checkpoint(10, str(entries[-1]["mac"]))).ok
    report = verify_files(log.files(), KEY, Checkpoint(7, "f" * 64))
    assert (report.ok, report.first_bad_line, report.file) == (False, 7, "audit.jsonl")
    assert str(report.reason).startswith("truncated: ")


def test_log_longer_than_checkpoint_is_ok(log: AuditLog) -> None:
    """A crash between an append and its checkpoint leaves the checkpoint behind."""
    entries = fill(log, 10)
    assert verify_files(log.files(), KEY, Checkpoint(6, str(entries[5]["mac"]))).ok
    assert verify_files(log.files(), KEY, Checkpoint(0, GENESIS_MAC)).ok


def test_incomplete_last_line_is_truncated_and_blocks_appends(log: AuditLog) -> None:
    fill(log, 5)
    path = log.files()[0]
    data = path.read_bytes()
    path.write_bytes(data[:-30])
    report = verify_files(log.files(), KEY, None)
    assert (report.ok, report.first_bad_line, report.entries) == (False, 5, 4)
    assert str(report.reason).startswith("truncated: ")
    with AuditLog(path.parent, KEY, fsync=False) as other, pytest.raises(AuditError):
        other.append(event())


def test_other_key_is_wrong_key(log: AuditLog) -> None:
    fill(log, 5)
    report = verify_files(log.files(), OTHER_KEY, None)
    assert (report.ok, report.first_bad_line, report.entries) == (False, 1, 0)
    assert str(report.reason).startswith("wrong key: ")
    assert key_id(KEY) in str(report.reason)


def test_line_from_another_key_is_wrong_key(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a", KEY, fsync=False) as a:
        fill(a, 5)
    with AuditLog(tmp_path / "b", OTHER_KEY, fsync=False) as b:
        fill(b, 5)
    lines = read_lines(a.files()[0])
    lines[2] = read_lines(b.files()[0])[2]
    write_lines(a.files()[0], lines)
    report = verify_files(a.files(), KEY, None)
    assert (report.first_bad_line, report.entries) == (3, 2)
    assert str(report.reason).startswith("wrong key: ")


def test_line_from_another_chain_with_the_same_key_is_removed(tmp_path: Path) -> None:
    """Same key, right seq, but it does not chain: the line it replaced was removed."""
    with AuditLog(tmp_path / "a", KEY, fsync=False) as a:
        fill(a, 6)
    with AuditLog(tmp_path / "b", KEY, fsync=False) as b:
        fill(b, 6, start=100)
    lines = read_lines(a.files()[0])
    lines[3] = read_lines(b.files()[0])[3]
    write_lines(a.files()[0], lines)
    report = verify_files(a.files(), KEY, None)
    assert (report.first_bad_line, report.entries) == (4, 3)
    assert str(report.reason).startswith("removed: ")


def test_appending_after_the_log_was_cut_leaves_a_visible_gap(tmp_path: Path) -> None:
    store = MemoryCheckpointStore()
    with AuditLog(tmp_path, KEY, store, fsync=False) as log:
        fill(log, 10)
    (tmp_path / "audit.jsonl").unlink()
    with AuditLog(tmp_path, KEY, store, fsync=False) as log:
        assert log.append(event(10))["seq"] == 11
        report = log.verify()
    assert (report.ok, report.first_bad_line) == (False, 1)
    assert str(report.reason).startswith("removed: ")


# --- rotation ---------------------------------------------------------------------------------


@pytest.fixture
def rotated(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog(tmp_path / "audit", KEY, MemoryCheckpointStore(), 2000, fsync=False) as log:
        fill(log, 40)
        yield log


def test_rotation_keeps_the_chain(rotated: AuditLog) -> None:
    files = rotated.files()
    assert len(files) >= 4
    names = [path.name for path in files]
    assert names == [f"audit-{i:06d}.jsonl" for i in range(1, len(files))] + ["audit.jsonl"]
    for path in files:
        assert path.stat().st_size <= 2000
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert rotated.verify() == audit.VerifyReport(ok=True, entries=40)
    assert [entry["seq"] for entry in all_entries(rotated)] == list(range(1, 41))
    for older, newer in itertools.pairwise(files):
        last = json.loads(read_lines(older)[-1])
        first = json.loads(read_lines(newer)[0])
        assert first["prev"] == last["mac"]
        assert first["seq"] == last["seq"] + 1


def test_tampering_in_a_rotated_file_names_the_global_line(rotated: AuditLog) -> None:
    first, second = rotated.files()[:2]
    lines = read_lines(second)
    lines[1] = lines[1].replace(b'"outcome":"ok"', b'"outcome":"denied"')
    write_lines(second, lines)
    report = rotated.verify()
    expected_line = len(read_lines(first)) + 2
    assert (report.ok, report.first_bad_line, report.entries) == (
        False,
        expected_line,
        expected_line - 1,
    )
    assert report.file == "audit-000002.jsonl"
    assert str(report.reason).startswith("edited: ")


def test_removed_rotated_file_is_removed(rotated: AuditLog) -> None:
    first, second, third = rotated.files()[:3]
    expected_line = len(read_lines(first)) + 1
    second.unlink()
    report = rotated.verify()
    assert (report.first_bad_line, report.file) == (expected_line, third.name)
    assert str(report.reason).startswith("removed: ")


def test_lines_moved_between_rotated_files_are_reordered(rotated: AuditLog) -> None:
    first, second = rotated.files()[:2]
    a, b = read_lines(first), read_lines(second)
    a[-1], b[0] = b[0], a[-1]
    write_lines(first, a)
    write_lines(second, b)
    report = rotated.verify()
    assert (report.first_bad_line, report.file) == (len(a), first.name)
    assert str(report.reason).startswith("reordered: ")


def test_one_later_file_alone_needs_partial(rotated: AuditLog) -> None:
    files = rotated.files()
    second, current = files[1], files[-1]
    # The whole chain starts at seq 1: a later file alone looks like lines were removed.
    alone = verify_files([second], KEY, None)
    assert (alone.ok, alone.first_bad_line) == (False, 1)
    assert str(alone.reason).startswith("removed: ")
    count = len(read_lines(second))
    assert verify_files([second], KEY, None, partial=True) == audit.VerifyReport(True, count)
    assert verify_files(files[1:], KEY, None, partial=True).ok
    checkpoint = Checkpoint(40, str(json.loads(read_lines(current)[-1])["mac"]))
    assert verify_files([current], KEY, checkpoint, partial=True).ok
    assert verify_files([second], KEY, checkpoint, partial=True).reason == (
        f"truncated: the checkpoint records 40 lines, the log ends at seq "
        f"{json.loads(read_lines(second)[-1])['seq']}"
    )
    lines = read_lines(second)
    lines[2] = lines[2].replace(b'"outcome":"ok"', b'"outcome":"error"')
    write_lines(second, lines)
    report = verify_files([second], KEY, None, partial=True)
    assert (report.first_bad_line, report.file) == (3, second.name)
    assert str(report.reason).startswith("edited: ")


# --- concurrency ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", [audit.DEFAULT_MAX_BYTES, 8192])
def test_concurrent_appends_from_threads(tmp_path: Path, max_bytes: int) -> None:
    store = MemoryCheckpointStore()
    with AuditLog(tmp_path, KEY, store, max_bytes, fsync=False) as log:
        barrier = threading.Barrier(8)

        def worker(t: int) -> None:
            barrier.wait()
            for i in range(125):
                log.append(event(t * 1000 + i, actor=f"thread-{t}"))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert log.verify() == audit.VerifyReport(ok=True, entries=1000)
        entries = all_entries(log)
    assert [entry["seq"] for entry in entries] == list(range(1, 1001))
    assert store.load() == Checkpoint(1000, str(entries[-1]["mac"]))


def test_verify_while_appending(tmp_path: Path) -> None:
    with AuditLog(tmp_path, KEY, MemoryCheckpointStore(), 4096, fsync=False) as log:
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set():
                log.append(event(i))
                i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            reports = [log.verify() for _ in range(30)]
        finally:
            stop.set()
            thread.join()
        assert all(report.ok for report in reports), [r for r in reports if not r.ok]
        assert log.verify().ok


CHILD = """
import sys, time
from pathlib import Path
from nox_api.services.audit import AuditEvent, AuditLog, FileCheckpointStore
folder, checkpoint, who, go = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
go.with_name("ready-" + who).touch()
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.001)
with AuditLog(folder, bytes(range(32)), FileCheckpointStore(checkpoint), max_bytes=16384) as log:
    for i in range(200):
        log.append(AuditEvent("run", "ok", actor_name=who, target=str(i)))
"""


def test_two_processes_append_to_one_folder(tmp_path: Path) -> None:
    folder, checkpoint, go = tmp_path / "audit", tmp_path / "checkpoint.json", tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(folder), str(checkpoint), who, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for who in ("p1", "p2")
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{who}").exists() for who in ("p1", "p2")):
        assert time.monotonic() < deadline, "the children did not start"
        assert all(child.poll() is None for child in children), "a child failed early"
        time.sleep(0.005)
    go.touch()  # both start appending at once
    for child in children:
        _, err = child.communicate(timeout=100)
        assert child.returncode == 0, err.decode()
    store = FileCheckpointStore(checkpoint)
    with AuditLog(folder, KEY, store) as log:
        assert len(log.files()) > 2
        assert log.verify() == audit.VerifyReport(ok=True, entries=400)
        entries = all_entries(log)
    assert [entry["seq"] for entry in entries] == list(range(1, 401))
    for who in ("p1", "p2"):
        mine = [entry["target"] for entry in entries if entry["actor_name"] == who]
        assert mine == [str(i) for i in range(200)]
    assert store.load() == Checkpoint(400, str(entries[-1]["mac"]))


def test_forked_child_uses_its_own_lock(tmp_path: Path) -> None:
    """A child forked with the log open must not share the parent's flock."""
    with AuditLog(tmp_path, KEY, fsync=False) as log:
        log.append(event(0, actor="parent"))  # the parent's descriptors are open

        def child_appends() -> None:
            for i in range(300):
                log.append(event(i, actor="child"))

        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=child_appends)
        child.start()
        for i in range(300):
            log.append(event(i, actor="parent"))
        child.join(60)
        assert child.exitcode == 0
        assert log.verify() == audit.VerifyReport(ok=True, entries=601)


# --- keys -------------------------------------------------------------------------------------


def test_key_file_created_private_and_reused(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path, None)
    path = tmp_path / "audit.key"
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(rb"[0-9a-f]{64}", path.read_bytes())
    assert bytes.fromhex(path.read_text()) == key
    assert load_or_create_key(tmp_path, None) == key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.key"]


def test_key_file_with_loose_mode_is_fixed(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path, None)
    path = tmp_path / "audit.key"
    path.chmod(0o644)
    assert load_or_create_key(tmp_path, None) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_damaged_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "audit.key").write_text("not a key")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        load_or_create_key(tmp_path, None)


def test_concurrent_key_creation_agrees(tmp_path: Path) -> None:
    barrier = threading.Barrier(8)
    keys: list[bytes] = []

    def worker() -> None:
        barrier.wait()
        keys.append(load_or_create_key(tmp_path, None))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8
    assert len(set(keys)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.key"]


def test_env_key_wins_and_short_one_is_refused(tmp_path: Path) -> None:
    assert load_or_create_key(tmp_path, "0123456789abcdef") == b"0123456789abcdef"
    assert load_or_create_key(tmp_path, "clé-de-seize-car") == "clé-de-seize-car".encode()
    assert not (tmp_path / "audit.key").exists()
    for short in ("", "0123456789abcde"):
        with pytest.raises(ValueError, match="at least 16"):
            load_or_create_key(tmp_path, short)
    with pytest.raises(ValueError, match="at least 16"):
        AuditLog(tmp_path, b"short")


# --- events and checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize(
    "details",
    [
        {"token": "x"},
        {"Token": "x"},
        {"access_token": "x"},
        {"apiKey": "x"},
        {"api_key": "x"},
        {"key": "x"},
        {"client_secret": "x"},
        {"PASSWORD": "x"},
        {"nested": {"secret": "x"}},
        {"items": [{"password": "x"}]},
    ],
)
def test_secret_looking_details_are_refused(details: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="looks like a secret"):
        AuditEvent("token.create", "ok", details=details)


def test_ordinary_details_are_kept_as_a_copy() -> None:
    details: dict[str, object] = {"sha256": "ab", "monkey": 1, "keyboard": [1, 2], "kid": "x"}
    ev = AuditEvent("run", "ok", details=details)
    details["sha256"] = "changed"
    assert ev.details == {"sha256": "ab", "monkey": 1, "keyboard": [1, 2], "kid": "x"}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"action": "run", "outcome": "maybe"}, ValueError),
        ({"action": "", "outcome": "ok"}, ValueError),
        ({"action": "Run Code", "outcome": "ok"}, ValueError),
        ({"action": "run", "outcome": "ok", "details": {"x": object()}}, ValueError),
        ({"action": "run", "outcome": "ok", "details": {"x": float("nan")}}, ValueError),
        ({"action": "run", "outcome": "ok", "details": {"x": "y" * 9000}}, ValueError),
        ({"action": "run", "outcome": "ok", "details": {1: "y"}}, ValueError),
        ({"action": "run", "outcome": "ok", "target": 5}, TypeError),
        ({"action": "run", "outcome": "ok", "target": "\ud800"}, ValueError),
    ],
)
def test_invalid_events_are_refused(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        AuditEvent(**kwargs)  # type: ignore[arg-type]


def test_file_checkpoint_store(tmp_path: Path) -> None:
    store = FileCheckpointStore(tmp_path / "cp.json")
    assert store.load() is None
    store.save(Checkpoint(3, "a" * 64))
    store.save(Checkpoint(4, "b" * 64))
    assert store.load() == Checkpoint(4, "b" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cp.json"]
    (tmp_path / "cp.json").write_text('{"count": "x"}')
    with pytest.raises(ValueError, match="damaged"):
        store.load()
    with pytest.raises(ValueError, match=">= 0"):
        Checkpoint(-1, GENESIS_MAC)


# --- query and secrets ------------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog(tmp_path, KEY, max_bytes=3000, fsync=False) as log:
        for i in range(60):
            action = ("run", "file.upload", "token.revoke")[i % 3]
            actor = ("alice", "bob")[i % 2]
            log.append(event(i, action=action, actor=actor, workspace=f"ws{i % 4}"))
        assert len(log.files()) >= 4
        yield log


def test_query_newest_first_with_filters(mixed: AuditLog) -> None:
    newest = mixed.query(limit=5)
    assert [entry["seq"] for entry in newest] == [60, 59, 58, 57, 56]
    runs = mixed.query(limit=100, action="run")
    assert [entry["seq"] for entry in runs] == list(range(58, 0, -3))
    bob = mixed.query(limit=100, actor="bob")
    assert [entry["seq"] for entry in bob] == list(range(60, 0, -2))
    assert mixed.query(limit=100, actor="id-bob") == bob
    both = mixed.query(limit=100, action="file.upload", actor="alice")
    assert [entry["seq"] for entry in both] == list(range(59, 0, -6))
    ws = mixed.query(limit=3, workspace="ws1")
    assert [entry["seq"] for entry in ws] == [58, 54, 50]
    assert mixed.query(limit=10, actor="nobody") == []
    assert mixed.query(limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        mixed.query(limit=-1)
    assert newest[0] == all_entries(mixed)[-1]


def test_query_limit_spans_rotated_files_and_stops_early(
    mixed: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = mixed.files()
    in_current = len(read_lines(files[-1]))
    in_last_rotated = len(read_lines(files[-2]))
    opened: list[str] = []
    real_open = Path.open

    def recording_open(self: Path, *args: object, **kwargs: object) -> object:
        opened.append(self.name)
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", recording_open)
    limit = in_current + 2
    assert limit <= in_current + in_last_rotated
    entries = mixed.query(limit=limit)
    assert [entry["seq"] for entry in entries] == list(range(60, 60 - limit, -1))
    assert opened == [files[-1].name, files[-2].name]


def test_query_skips_an_incomplete_last_line(tmp_path: Path) -> None:
    with AuditLog(tmp_path, KEY, fsync=False) as log:
        fill(log, 3)
        with (tmp_path / "audit.jsonl").open("ab") as f:
            f.write(b'{"action":"run","partial')
        assert [entry["seq"] for entry in log.query()] == [3, 2, 1]


def test_query_reads_long_files_backwards_in_blocks(tmp_path: Path) -> None:
    with AuditLog(tmp_path, KEY, fsync=False) as log:
        fill(log, 400)  # about 200 KiB: several 64 KiB blocks
        assert [entry["seq"] for entry in log.query(limit=1000)] == list(range(400, 0, -1))


def _keys(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for name, item in value.items():
            yield name
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


def test_no_secret_ends_up_in_the_file(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path, None)
    with AuditLog(tmp_path / "audit", key, fsync=False) as log:
        log.append(
            AuditEvent(
                "token.create",
                "ok",
                actor_id="env",
                actor_name="admin",
                role="admin",
                workspace="default",
                target="tok123",
                details={"name": "ci", "role": "runner", "expires_days": 30},
            )
        )
        log.append(AuditEvent("auth.failure", "denied", client="203.0.113.9"))
        fill(log, 5)
        data = b"".join(path.read_bytes() for path in log.files())
        entries = all_entries(log)
    assert key not in data
    assert key.hex().encode() not in data
    for entry in entries:
        names = list(_keys(entry))
        assert not [name for name in names if SECRET_NAME_RE.search(name)], names
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == ["audit.jsonl", "audit.lock"]
    assert os.stat(tmp_path / "audit.key").st_mode & 0o077 == 0
