"""The file routes under pressure: capped listings of huge folders, deep trees and many walks at
once, files changed by someone else mid-request, parallel uploads against one quota, and the
multipart parser's writes kept off the event loop. Real files, real threads; the quota and
/put tests use a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from tests.conftest import _token, nox_of, uvicorn_serving, write_policy
from tests.conftest import error_message as _error
from tests.test_files_api import _auth, _temp_files, _tree, _ws

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.services import files as files_module
from nox_api.services import tree_walk, workspace_files
from nox_api.services.tokens import Role
from nox_api.services.tree_walk import HELD_LEVELS, TreeWalk

KIB = 1024
MIB = 1024 * KIB
FAST_LIMITS = "rate_limits:\n  roles:\n    admin: 1000000/minute\n    runner: 1000000/minute\n"


# -- 1. a capped listing picks its first names instead of sorting the folder ---------------------


def test_a_capped_listing_holds_the_cap_not_the_folder(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _ws(settings) / "many"
    folder.mkdir()
    names = [f"f{(i * 7919) % 5000:05d}" for i in range(5000)]  # made out of order
    for name in names:
        os.close(os.open(folder / name, os.O_WRONLY | os.O_CREAT, 0o644))
    (folder / "zz-dir").mkdir()
    monkeypatch.setattr(workspace_files, "LIST_MAX_ENTRIES", 10)
    nox = nox_of(client)
    tracemalloc.start()
    try:
        listing = nox.files.listing("default", "many", recursive=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.name for e in listing.entries] == sorted(names)[:10]
    assert listing.truncated is True
    # 5,000 entries sorted whole held about 720 KB here; the first ten, a few KB
    assert peak < 200_000, peak
    whole = client.get("/api/files", params={"path": "many"}).json()
    assert len(whole["entries"]) == 10
    assert whole["truncated"] is True


def test_a_capped_recursive_listing_is_the_uncapped_one_cut(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = _ws(settings)
    for path in ("b/2", "b/1/x", "a/y", "c", "a/z/q"):
        (ws / path).parent.mkdir(parents=True, exist_ok=True)
        (ws / path).write_text(path)
    os.mkfifo(ws / "a" / "0-fifo")  # not listed: it must not take a place under the cap
    whole = client.get("/api/files", params={"recursive": "true"}).json()["entries"]
    for cap in range(1, len(whole) + 1):
        monkeypatch.setattr(workspace_files, "LIST_MAX_ENTRIES", cap)
        cut = client.get("/api/files", params={"recursive": "true"}).json()
        assert cut["entries"] == whole[:cap]
        assert cut["truncated"] is (cap < len(whole))


# -- 2. deep trees and many walks ----------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _reference(root: Path, base: str = "") -> list[str]:
    """Every entry below ``root`` in the walk's order (names sorted, a folder before its
    content), by plain recursion."""
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        path = f"{base}{entry.name}"
        found.append(path)
        if entry.is_dir(follow_symlinks=False):
            found.extend(_reference(Path(entry.path), f"{path}/"))
    return found


def test_a_deep_walk_holds_a_bounded_number_of_descriptors(tmp_path: Path) -> None:
    """150 levels, each with a file and a sibling folder: the walk comes back up through
    folders it closed, so it opens them again (checked to be the same), and never holds more
    than HELD_LEVELS descriptors."""
    depth = 150
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("s", dir_fd=fd)
        os.close(os.open("s/g", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        os.close(os.open("f.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = _open_fds()
        most = 0
        seen = []
        walk = TreeWalk(root, [], recursive=True)
        for item in walk:
            seen.append(item.path)
            most = max(most, _open_fds() - before)
        assert _open_fds() == before  # every descriptor closed again
    finally:
        os.close(root)
    assert seen == _reference(tmp_path)
    assert walk.cut is False
    assert most <= HELD_LEVELS + 1  # (+1: the listing of /proc/self/fd itself)


def test_a_folder_swapped_while_the_walk_had_it_closed_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tree_walk, "HELD_LEVELS", 3)
    (tmp_path / "a/b/c/d/e").mkdir(parents=True)
    (tmp_path / "a/b/y.txt").write_text("old b")
    (tmp_path / "a/z.txt").write_text("a")
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walk = TreeWalk(root, [], recursive=True)
        seen = []
        for item in walk:
            seen.append(item.path)
            if item.path == "a/b/c/d/e":  # a and b are closed now: swap b for another folder
                (tmp_path / "a/b").rename(tmp_path / "b-moved")
                (tmp_path / "a/b").mkdir()
                (tmp_path / "a/b/evil.txt").write_text("new b")
    finally:
        os.close(root)
    assert seen == ["a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e", "a/z.txt"]
    assert walk.cut is True


def _blocking_search(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Searches wait for ``release`` once ``entered`` is set (they hold their walk)."""
    entered, release = threading.Event(), threading.Event()
    real = workspace_files.search_tree

    def search_tree(*args: Any) -> Any:
        entered.set()
        assert release.wait(20)
        return real(*args)

    monkeypatch.setattr(workspace_files, "search_tree", search_tree)
    return entered, release


def test_walks_past_the_servers_cap_wait_then_get_429(
    data_dir: Path, fake: FakeSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(data_dir=data_dir, pool_size=0, file_walks_max=1,
                             file_walks_wait_s=0.3)  # fmt: skip
    token = _token(settings, Role.VIEWER)
    entered, release = _blocking_search(monkeypatch)
    with TestClient(create_app(settings, sandbox=fake), headers=_auth(token)) as c:
        _ws(settings).joinpath("a.txt").write_text("needle")
        first: list[int] = []
        holder = threading.Thread(
            target=lambda: first.append(
                c.post("/api/files/search", json={"query": "needle"}).status_code
            )
        )
        holder.start()
        try:
            assert entered.wait(10)
            began = time.monotonic()
            busy = c.get("/api/files", params={"recursive": "true"})
            waited = time.monotonic() - began
            message = _error(busy, 429, "rate_limited")
            assert "1 recursive listings and file searches are running" in message
            assert "NOX_FILE_WALKS_MAX" in message
            assert busy.headers["Retry-After"] == "1"
            assert "X-RateLimit-Limit" in busy.headers
            assert 0.3 <= waited < 5
            _error(c.post("/api/files/search", json={"query": "x"}), 429, "rate_limited")
            assert c.get("/api/files").status_code == 200  # a flat listing is no walk
        finally:
            release.set()
            holder.join(20)
        assert first == [200]
        assert c.get("/api/files", params={"recursive": "true"}).status_code == 200


def test_a_walk_waiting_for_its_turn_gets_it_when_one_ends(
    data_dir: Path, fake: FakeSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(data_dir=data_dir, pool_size=0, file_walks_max=1,
                             file_walks_wait_s=10)  # fmt: skip
    token = _token(settings, Role.VIEWER)
    entered, release = _blocking_search(monkeypatch)
    with TestClient(create_app(settings, sandbox=fake), headers=_auth(token)) as c:
        holder = threading.Thread(target=lambda: c.post("/api/files/search", json={"query": "x"}))
        holder.start()
        assert entered.wait(10)
        threading.Timer(0.3, release.set).start()
        began = time.monotonic()
        assert c.get("/api/files", params={"recursive": "true"}).status_code == 200
        assert 0.25 <= time.monotonic() - began < 10
        holder.join(20)


# -- 3. a file or folder changed between the check and the act ------------------------------------


@contextmanager
def _patched(monkeypatch: pytest.MonkeyPatch, name: str, target: str,
             before: Callable[[], None]) -> Iterator[list[str]]:  # fmt: skip
    """``os.<name>`` runs ``before`` first when it acts on ``target`` (once): what a run
    does between the route's check and its act. Other calls pass through."""
    real = getattr(os, name)
    done: list[str] = []

    def racing(*args: Any, **kwargs: Any) -> Any:
        if not done and any(str(a).endswith(target) for a in args[:2]):
            done.append(target)
            before()
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, name, racing)
        yield done


def test_a_folder_removed_between_the_check_and_its_removal_is_404(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    (_ws(settings) / "gone").mkdir()
    with _patched(monkeypatch, "rmdir", "gone", (_ws(settings) / "gone").rmdir) as hit:
        resp = client.delete("/api/files/gone")
    assert hit == ["gone"]
    assert _error(resp, 404, "not_found") == "gone was removed while this request ran"


def test_a_file_that_became_a_folder_before_its_removal_is_409(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = _ws(settings)
    (ws / "f").write_text("file")

    def swap() -> None:
        (ws / "f").unlink()
        (ws / "f").mkdir()

    with _patched(monkeypatch, "unlink", "f", swap) as hit:
        resp = client.delete("/api/files/f")
    assert hit == ["f"]
    message = _error(resp, 409, "conflict")
    assert message.startswith("f changed while this request ran (")
    assert (ws / "f").is_dir()  # what appeared is left alone


def test_a_folder_emptied_check_then_filled_is_409(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = _ws(settings)
    (ws / "d").mkdir()
    with _patched(monkeypatch, "rmdir", "d", lambda: (ws / "d" / "new").write_text("x")):
        resp = client.delete("/api/files/d")
    assert "not empty; delete it with recursive=true" in _error(resp, 409, "conflict")


@pytest.mark.parametrize("route", ["put", "post"])
def test_a_target_that_became_a_folder_before_the_rename_is_409(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    ws = _ws(settings)
    (ws / "sub").mkdir()

    def fill() -> None:
        (ws / "sub" / "t").mkdir()
        (ws / "sub" / "t" / "inside").write_text("made by a run")

    with _patched(monkeypatch, "rename", "t", fill) as hit:
        if route == "put":
            resp = client.put("/api/files/sub/t", content=b"upload")
        else:
            resp = client.post("/put", files={"file": ("t", b"upload")}, data={"path": "sub/t"})
    assert hit == ["t"]
    assert _error(resp, 409, "conflict").startswith("sub/t changed while this request ran (")
    assert (ws / "sub" / "t" / "inside").read_text() == "made by a run"
    assert _temp_files(settings.data_path) == []
    assert list(settings.staging_dir.iterdir()) == []


def test_a_folder_removed_before_the_upload_starts_writing_is_409(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = _ws(settings)
    (ws / "dir").mkdir()
    real = workspace_files._refuse_folder

    def refuse_then_remove(dir_fd: int, parts: list[str]) -> None:
        real(dir_fd, parts)
        (ws / "dir").rmdir()  # a run removes the folder the upload is about to write into

    monkeypatch.setattr(workspace_files, "_refuse_folder", refuse_then_remove)
    resp = client.put("/api/files/dir/new.txt", content=b"x")
    message = _error(resp, 409, "conflict")
    assert message == "a folder of dir/new.txt was removed while it was written; send it again"
    assert not (ws / "dir").exists()


def test_a_parent_folder_removed_each_time_it_is_made_is_409(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recursive delete racing an upload removes each new parent folder right after it was
    made (and given to the sandbox user): the upload gives up after a few turns with 409, not
    400 or 500."""
    ws = _ws(settings)
    real_chown = os.chown
    made: list[str] = []

    def chown_then_removed(path: Any, *args: Any, **kwargs: Any) -> None:
        real_chown(path, *args, **kwargs)
        if str(path) == "doomed":
            made.append("doomed")
            os.rmdir(path, dir_fd=kwargs.get("dir_fd"))

    monkeypatch.setattr(os, "chown", chown_then_removed)
    resp = client.put("/api/files/doomed/f.txt", content=b"x")
    assert len(made) == 3, resp.text
    assert _error(resp, 409, "conflict") == (
        "doomed was removed while it was being created; try again"
    )
    assert not (ws / "doomed").exists()
    assert _temp_files(settings.data_path) == []


def test_concurrent_writes_deletes_and_listings_of_one_tree_never_fail_500(
    data_dir: Path, fake: FakeSandbox
) -> None:
    """Uploads into a tree, recursive deletes of it and listings of it, at once, from 6
    threads: every answer is one the API documents, never a 500."""
    policy = write_policy(data_dir, FAST_LIMITS)
    settings = load_settings(data_dir=data_dir, pool_size=0, policy_file=policy)
    token = _token(settings, Role.ADMIN)
    allowed = {200, 201, 204, 404, 409}
    statuses: list[int] = []
    bad: list[str] = []
    deadline = time.monotonic() + 20

    with TestClient(create_app(settings, sandbox=fake), headers=_auth(token)) as c:

        def hammer(act: Callable[[int], Any]) -> None:
            for i in range(60):
                if time.monotonic() > deadline:
                    return
                resp = act(i)
                statuses.append(resp.status_code)
                if resp.status_code not in allowed:
                    bad.append(f"{resp.request.method} {resp.request.url.path}: {resp.text}")

        acts: list[Callable[[int], Any]] = [
            lambda i: c.put(f"/api/files/race/a{i % 3}/b/f{i % 5}.txt", content=b"x" * 100),
            lambda i: c.put(f"/api/files/race/a{i % 2}/f.txt", content=b"y" * 100),
            lambda i: c.delete("/api/files/race", params={"recursive": "true"}),
            lambda i: c.delete(f"/api/files/race/a{i % 3}/b", params={"recursive": "true"}),
            lambda i: c.get("/api/files", params={"path": "race", "recursive": "true"}),
            lambda i: c.post(
                "/put", files={"file": ("g", b"z")}, data={"path": f"race/a{i % 3}/g"}
            ),
        ]
        threads = [threading.Thread(target=hammer, args=(act,)) for act in acts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert bad == []
    assert len(statuses) >= 6 * 20
    assert {201, 204} <= set(statuses)
    assert _temp_files(settings.data_path) == []


# -- 4. parallel uploads against one storage quota ------------------------------------------------


@contextmanager
def _served(settings: Settings) -> Iterator[tuple[str, TestClient | Any]]:
    """The app on uvicorn in a thread, on 127.0.0.1; its base URL and its parts."""
    app = create_app(settings, sandbox=FakeSandbox())
    with uvicorn_serving(app) as (url, _server):
        yield url, app.state.nox


def _slow(size: int, steps: int = 10, pause_s: float = 0.02) -> Iterator[bytes]:
    """``size`` bytes in ``steps`` pieces, a pause before each: the uploads overlap."""
    piece = size // steps
    for i in range(steps):
        time.sleep(pause_s)
        yield b"q" * (piece if i < steps - 1 else size - piece * (steps - 1))


def _stored(ws: Path) -> int:
    return sum(p.stat().st_size for p in ws.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", ["declared", "streamed", "multipart"])
def test_parallel_uploads_cannot_pass_the_storage_quota_together(data_dir: Path, how: str) -> None:
    """1 MiB of storage, 6 uploads of 300 KiB at once (each alone would fit): what lands
    stays within the quota, the rest is 507, and nothing stays held."""
    policy = write_policy(data_dir, FAST_LIMITS + "quotas:\n  default:\n    storage_mib: 1\n")
    settings = load_settings(data_dir=data_dir, pool_size=0, policy_file=policy)
    token = _token(settings, Role.RUNNER)
    size, count = 300 * KIB, 6
    answers: list[tuple[int, str]] = []
    with _served(settings) as (url, nox):
        start = threading.Barrier(count)

        def upload(i: int) -> None:
            with httpx2.Client(base_url=url, headers=_auth(token), timeout=60) as http:
                start.wait(10)
                if how == "declared":
                    resp = http.put(f"/api/files/f{i}", content=_slow(size),
                                    headers={"Content-Length": str(size)})  # fmt: skip
                elif how == "streamed":  # no Content-Length: held as it streams
                    resp = http.put(f"/api/files/f{i}", content=_slow(size))
                else:
                    resp = http.post("/put", files={"file": (f"f{i}", b"q" * size)})
                answers.append((resp.status_code, resp.text))

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert nox.uploads.held("default") == 0
    ws = settings.workspaces_dir / "default"
    landed = sum(1 for status, _ in answers if status == 201)
    assert len(answers) == count
    assert {status for status, _ in answers} <= {201, 507}, answers
    assert _stored(ws) == landed * size <= MIB
    if how == "declared":  # known sizes: exactly what fits lands
        assert landed == MIB // size
    assert all("storage_quota_exceeded" in text for status, text in answers if status == 507)
    assert _temp_files(settings.data_path) == []
    assert list(settings.staging_dir.iterdir()) == []


def test_a_reservation_is_released_whatever_ends_the_upload(
    client: TestClient, settings: Settings
) -> None:
    nox = nox_of(client)
    assert client.put("/api/files/ok", content=b"x" * 1000).status_code == 201
    _error(client.put("/api/files/", content=b"x"), 400, "invalid_path")
    (_ws(settings) / "folder").mkdir()
    _error(client.put("/api/files/folder", content=b"x"), 409, "conflict")
    form = {"Content-Type": "multipart/form-data; boundary=zz"}
    _error(client.post("/put", content=b"junk", headers=form), 400, "invalid_request")
    assert nox.uploads.held("default") == 0
    assert nox.uploads._ledgers == {}  # nothing kept for idle workspaces


# -- 5. /put writes off the event loop ------------------------------------------------------------


def test_put_writes_its_file_off_the_event_loop_a_megabyte_at_a_time(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[tuple[bool, int]] = []
    real_write = files_module.CappedWriter.write

    def write(self: files_module.CappedWriter, data: bytes) -> None:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        writes.append((on_loop, len(data)))
        real_write(self, data)

    monkeypatch.setattr(files_module.CappedWriter, "write", write)
    policy = write_policy(data_dir, FAST_LIMITS)
    settings = load_settings(data_dir=data_dir, pool_size=0, policy_file=policy)
    token = _token(settings, Role.RUNNER)
    data = os.urandom(5 * MIB + 123)
    with (
        _served(settings) as (url, _nox),
        httpx2.Client(base_url=url, headers=_auth(token), timeout=60) as http,
    ):
        resp = http.post("/put", files={"file": ("big.bin", data)}, data={"path": "big.bin"})
    assert resp.status_code == 201, resp.text
    assert (settings.workspaces_dir / "default" / "big.bin").read_bytes() == data
    assert writes
    assert not any(on_loop for on_loop, _ in writes)
    assert sum(n for _, n in writes) == len(data)
    assert len(writes) >= 5  # gathered a megabyte (and a network read) at a time, not whole
    assert max(n for _, n in writes) <= MIB + 256 * KIB
    _tree(settings.workspaces_dir)  # readable, no leftovers below
    assert list(settings.staging_dir.iterdir()) == []
