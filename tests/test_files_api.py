"""The Files API on the fake sandbox: list, read, write, delete, search; roles, quotas, budgets,
traversal attempts on every route (also as raw HTTP through a real uvicorn server) and a 200 MiB
file both ways through a server process whose memory must not grow with it. Real files on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
import psutil
import pytest
from fastapi.testclient import TestClient
from tests.conftest import _token, free_port, write_policy
from tests.conftest import error_message as _error

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.services import files as files_module
from nox_api.services import workspace_files
from nox_api.services.file_search import (
    MAX_PROGRAM_SIZE,
    REGEX_LINE_BYTES,
    SNIFF_BYTES,
    TEXT_MAX_CHARS,
)
from nox_api.services.tokens import Role
from nox_api.services.workspace_files import UPLOAD_PREFIX

KIB = 1024
MIB = 1024 * KIB
SECRET = b"TOP-SECRET-SENTINEL-0xC0FFEE"


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _ws(settings: Settings, name: str = "default") -> Path:
    folder = settings.workspaces_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(UPLOAD_PREFIX)]


def _tree(root: Path) -> dict[str, str]:
    """Every path below ``root`` (links not followed) with the SHA-256 of regular files."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


@contextlib.contextmanager
def _app(data_dir: Path, fake: FakeSandbox, **overrides: Any) -> Iterator[TestClient]:
    """An app of its own settings on ``data_dir``, with an admin token in its headers."""
    settings = load_settings(data_dir=data_dir, pool_size=0, **overrides)
    token = _token(settings, Role.ADMIN)
    with TestClient(create_app(settings, sandbox=fake), headers=_auth(token)) as c:
        yield c


# --- PUT ---------------------------------------------------------------------------------------


def test_put_streams_the_body_to_the_file_creating_its_folders(
    client: TestClient, settings: Settings
) -> None:
    data = os.urandom(2 * MIB + 12_345)  # more than one write of the route's buffer

    def body() -> Iterator[bytes]:  # chunked: no Content-Length
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    resp = client.put("/api/files/deep/er/blob.bin", content=body())
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert info["path"] == "deep/er/blob.bin"
    assert info["name"] == "blob.bin"
    assert info["type"] == "file"
    assert info["size"] == len(data)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    target = _ws(settings) / "deep/er/blob.bin"
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o777 == 0o644
    if os.geteuid() == 0:  # given to the sandbox user, folders included
        for path in (target, target.parent, target.parent.parent):
            assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)
    assert _temp_files(settings.data_path) == []
    audit = client.get("/api/audit", params={"action": "file.upload"}).json()["items"]
    assert audit[0]["target"] == "deep/er/blob.bin"
    assert audit[0]["details"] == {"size": len(data), "sha256": info["sha256"]}
    assert client.app.state.nox.quotas.usage("default").upload_bytes == len(data)  # type: ignore[attr-defined]


def test_put_overwrites_and_replaces_a_link_without_writing_through_it(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    assert client.put("/api/files/notes.txt", content=b"one").status_code == 201
    assert client.put("/api/files/notes.txt", content=b"two").status_code == 201
    assert (_ws(settings) / "notes.txt").read_bytes() == b"two"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"original")
    (_ws(settings) / "link.txt").symlink_to(victim)
    resp = client.put("/api/files/link.txt", content=b"new")
    assert resp.status_code == 201
    assert victim.read_bytes() == b"original"
    assert not (_ws(settings) / "link.txt").is_symlink()
    assert (_ws(settings) / "link.txt").read_bytes() == b"new"
    empty = client.put("/api/files/empty", content=b"")
    assert empty.status_code == 201
    assert empty.json()["size"] == 0


def test_put_onto_a_folder_is_409_and_changes_nothing(
    client: TestClient, settings: Settings
) -> None:
    client.put("/api/files/dir/inner.txt", content=b"x")
    before = _tree(_ws(settings))
    message = _error(client.put("/api/files/dir", content=b"y"), 409, "conflict")
    assert "dir is a folder" in message
    assert _tree(_ws(settings)) == before
    assert _temp_files(settings.data_path) == []


def test_put_through_a_file_or_a_link_in_the_path_is_invalid(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    client.put("/api/files/plain", content=b"x")
    assert "plain is a file" in _error(
        client.put("/api/files/plain/child", content=b"x"), 400, "invalid_path"
    )
    outside = tmp_path / "outside"
    outside.mkdir()
    (_ws(settings) / "dirlink").symlink_to(outside)
    message = _error(client.put("/api/files/dirlink/x", content=b"evil"), 400, "invalid_path")
    assert message == "dirlink is a symbolic link; links are never followed in file paths"
    assert list(outside.iterdir()) == []


def test_put_over_the_cap_is_413_and_leaves_nothing(data_dir: Path, fake: FakeSandbox) -> None:
    with _app(data_dir, fake, max_upload_bytes=100_000) as c:
        settings: Settings = c.app.state.nox.settings  # type: ignore[attr-defined]
        ws = _ws(settings)
        before = _tree(ws)
        declared = c.put("/api/files/new/folder/big", content=b"x" * 100_001)
        assert "100000 bytes" in _error(declared, 413, "payload_too_large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: stopped while streaming
            for _ in range(40):
                yield b"y" * 10_000

        streamed = c.put("/api/files/new/folder/big", content=chunks())
        _error(streamed, 413, "payload_too_large")
        assert _tree(ws) == before  # no file, no temporary file, no new folder
        assert _temp_files(settings.data_path) == []
        assert c.put("/api/files/new/folder/big", content=b"x" * 100_000).status_code == 201


QUOTAS = """
quotas:
  default:
    storage_mib: 1
  workspaces:
    thrifty:
      upload_mib_per_day: 1
      storage_mib: 10
"""


def test_put_obeys_the_storage_and_daily_upload_quotas(
    data_dir: Path, fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    policy = write_policy(data_dir, QUOTAS)
    with _app(data_dir, fake, policy_file=policy) as c:
        settings: Settings = c.app.state.nox.settings  # type: ignore[attr-defined]
        assert c.put("/api/files/one", content=b"1" * (600 * KIB)).status_code == 201
        before = _tree(settings.workspaces_dir)
        full = c.put("/api/files/two", content=b"2" * (600 * KIB))
        assert "0.4 MiB left" in _error(full, 507, "storage_quota_exceeded")

        def chunks() -> Iterator[bytes]:  # the quota stops a body of unknown size too
            for _ in range(6):
                yield b"3" * (100 * KIB)

        _error(c.put("/api/files/three", content=chunks()), 507, "storage_quota_exceeded")
        thrifty = _auth(make_token(Role.RUNNER, "thrifty"))
        ok = c.put("/api/files/a", content=b"a" * (600 * KIB), headers=thrifty)
        assert ok.status_code == 201
        before = _tree(settings.workspaces_dir)
        over = c.put("/api/files/b", content=b"b" * (600 * KIB), headers=thrifty)
        assert "has uploaded 0.6 of its 1 MiB today" in _error(over, 429, "quota_exceeded")
        assert 1 <= int(over.headers["Retry-After"]) <= 86_400
        assert _tree(settings.workspaces_dir) == before
        assert _temp_files(settings.data_path) == []


def test_replacing_a_file_counts_only_what_it_adds_to_storage(
    data_dir: Path, fake: FakeSandbox
) -> None:
    """1 MiB of storage, 600 KiB stored in one file: sending that file again, even a little
    bigger, fits (the old one is freed when the new one lands); a second file does not."""
    policy = write_policy(data_dir, QUOTAS)
    with _app(data_dir, fake, policy_file=policy) as c:
        assert c.put("/api/files/one", content=b"1" * (600 * KIB)).status_code == 201
        again = c.put("/api/files/one", content=b"2" * (700 * KIB))
        assert again.status_code == 201, again.text
        _error(c.put("/api/files/two", content=b"3" * (600 * KIB)), 507, "storage_quota_exceeded")
        # a link where the file was is not a file: it frees nothing
        ws = c.app.state.nox.workspaces.path("default")  # type: ignore[attr-defined]
        (ws / "big-link").symlink_to(ws / "one")
        _error(
            c.put("/api/files/big-link", content=b"4" * (600 * KIB)), 507, "storage_quota_exceeded"
        )


# --- GET /api/files (list) ---------------------------------------------------------------------


def test_list_flat_and_recursive(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    for path in ("b.txt", "a/x.py", "a/sub/y.py", "a-b/z", "c/"):
        if path.endswith("/"):
            (_ws(settings) / path).mkdir()
        else:
            assert client.put(f"/api/files/{path}", content=path.encode()).status_code == 201
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "hidden.txt").write_bytes(SECRET)
    (_ws(settings) / "a/link").symlink_to(outside)
    os.mkfifo(_ws(settings) / "a/fifo")  # neither file nor folder: not listed
    (_ws(settings) / os.fsdecode(b"bad\xffname")).write_bytes(b"")

    flat = client.get("/api/files")
    assert flat.status_code == 200
    body = flat.json()
    assert body["path"] == ""
    assert body["truncated"] is False
    names = [(e["name"], e["type"]) for e in body["entries"]]
    assert names == [("a", "dir"), ("a-b", "dir"), ("b.txt", "file"), ("bad\ufffdname", "file"),
                     ("c", "dir")]  # fmt: skip
    b = body["entries"][2]
    assert b["path"] == "b.txt"
    assert b["size"] == len(b"b.txt")
    assert "sha256" not in b
    modified = datetime.fromisoformat(b["modified"])
    assert abs((datetime.now(UTC) - modified).total_seconds()) < 60
    assert client.get("/api/files", params={"path": "."}).json() == body

    deep = client.get("/api/files", params={"recursive": "true"}).json()
    paths = [(e["path"], e["type"]) for e in deep["entries"]]
    assert paths == [
        ("a", "dir"), ("a/link", "symlink"), ("a/sub", "dir"), ("a/sub/y.py", "file"),
        ("a/x.py", "file"), ("a-b", "dir"), ("a-b/z", "file"), ("b.txt", "file"),
        ("bad\ufffdname", "file"), ("c", "dir"),
    ]  # fmt: skip
    link = next(e for e in deep["entries"] if e["type"] == "symlink")
    assert link["size"] == len(str(outside))  # the link's own, never its target's
    sub = client.get("/api/files", params={"path": "a/./sub/../sub"}).json()
    assert sub["path"] == "a/sub"
    assert [e["path"] for e in sub["entries"]] == ["a/sub/y.py"]
    assert SECRET.decode() not in json.dumps(deep)


def test_list_refusals(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    client.put("/api/files/file.txt", content=b"x")
    (_ws(settings) / "link").symlink_to(tmp_path)
    assert _error(client.get("/api/files", params={"path": "nope"}), 404, "not_found")
    assert "file.txt is a file" in _error(
        client.get("/api/files", params={"path": "file.txt"}), 400, "invalid_path"
    )
    assert "link is a symbolic link" in _error(
        client.get("/api/files", params={"path": "link"}), 400, "invalid_path"
    )
    assert "symbolic link" in _error(
        client.get("/api/files", params={"path": "link/x", "recursive": "true"}),
        400,
        "invalid_path",
    )


def test_list_stops_at_its_entry_and_depth_caps(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.put("/api/files/1/2/3/4/5/deep.txt", content=b"x")
    monkeypatch.setattr(files_module, "MAX_DEPTH", 2)
    cut = client.get("/api/files", params={"recursive": "true"}).json()
    assert [e["path"] for e in cut["entries"]] == ["1", "1/2", "1/2/3"]
    assert cut["truncated"] is True
    monkeypatch.setattr(files_module, "MAX_DEPTH", 64)
    monkeypatch.setattr(workspace_files, "LIST_MAX_ENTRIES", 4)
    capped = client.get("/api/files", params={"recursive": "true"}).json()
    assert len(capped["entries"]) == 4
    assert capped["truncated"] is True
    monkeypatch.setattr(workspace_files, "LIST_MAX_ENTRIES", 6)
    whole = client.get("/api/files", params={"recursive": "true"}).json()
    assert len(whole["entries"]) == 6
    assert whole["truncated"] is False


# --- GET /api/files/{path} (read) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("data.json", "application/json"),
        ("pic.png", "image/png"),
        ("notes.txt", "text/plain"),
        ("page.html", "text/html"),
        ("blob.nox-unknown", "application/octet-stream"),
        ("Makefile", "application/octet-stream"),
    ],
)
def test_read_streams_the_bytes_with_length_and_type(
    client: TestClient, settings: Settings, name: str, media_type: str
) -> None:
    data = os.urandom(700 * KIB + 3)  # several read steps
    (_ws(settings) / "d").mkdir(exist_ok=True)
    (_ws(settings) / "d" / name).write_bytes(data)
    resp = client.get(f"/api/files/d/{name}")
    assert resp.status_code == 200
    assert resp.content == data
    assert resp.headers["content-length"] == str(len(data))
    assert resp.headers["content-type"] == media_type
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["content-disposition"] == f"attachment; filename*=UTF-8''{name}"
    assert resp.headers["x-ratelimit-limit"] == "600"


def test_read_refusals(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    ws = _ws(settings)
    (ws / "folder").mkdir()
    (ws / "link.txt").symlink_to(secret)
    (ws / "dirlink").symlink_to(tmp_path)
    os.mkfifo(ws / "pipe")
    message = _error(client.get("/api/files/folder"), 400, "invalid_request")
    assert message == "folder is a folder; list it with GET /api/files?path=folder"
    assert "link.txt is a symbolic link" in _error(
        client.get("/api/files/link.txt"), 400, "invalid_path"
    )
    assert "dirlink is a symbolic link" in _error(
        client.get("/api/files/dirlink/secret.txt"), 400, "invalid_path"
    )
    started = time.monotonic()
    assert "not a regular file" in _error(client.get("/api/files/pipe"), 400, "invalid_request")
    assert time.monotonic() - started < 5  # opening the FIFO did not wait for a writer
    assert _error(client.get("/api/files/nope.txt"), 404, "not_found") == "nope.txt does not exist"
    assert _error(client.get("/api/files/no/such.txt"), 404, "not_found")
    _error(client.get("/api/files/"), 400, "invalid_path")


def test_read_paths_are_normalised(client: TestClient) -> None:
    client.put("/api/files/b.txt", content=b"bee")
    assert client.get("/api/files/a/../b.txt").content == b"bee"
    assert client.get("/api/files/x/%2e%2e/b.txt").content == b"bee"  # inside: fine


# --- DELETE --------------------------------------------------------------------------------------


def test_delete_files_folders_and_links(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    ws = _ws(settings)
    for path in ("f.txt", "full/a.txt", "full/sub/b.txt"):
        client.put(f"/api/files/{path}", content=b"x")
    (ws / "empty").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(SECRET)
    (ws / "full/sub/escape").symlink_to(outside)
    (ws / "toplink").symlink_to(outside)

    assert client.delete("/api/files/f.txt").status_code == 204
    assert not (ws / "f.txt").exists()
    assert client.delete("/api/files/empty").status_code == 204
    assert not (ws / "empty").exists()
    message = _error(client.delete("/api/files/full"), 409, "conflict")
    assert message == "full is a folder that is not empty; delete it with recursive=true"
    assert (ws / "full/sub/b.txt").exists()
    assert "symbolic link" in _error(
        client.delete("/api/files/toplink/keep.txt"), 400, "invalid_path"
    )
    assert client.delete("/api/files/toplink").status_code == 204  # the link, not its target
    assert not (ws / "toplink").is_symlink()
    deleted = client.delete("/api/files/full", params={"recursive": "true"})
    assert deleted.status_code == 204
    assert deleted.headers["x-ratelimit-limit"] == "600"
    assert not (ws / "full").exists()
    assert (outside / "keep.txt").read_bytes() == SECRET  # a link inside was removed, not followed
    assert _error(client.delete("/api/files/f.txt"), 404, "not_found") == "f.txt does not exist"
    assert _error(client.delete("/api/files/no/such"), 404, "not_found")
    assert "empty" in _error(
        client.delete("/api/files/", params={"recursive": "true"}), 400, "invalid_path"
    )
    assert ws.is_dir()
    audit = client.get("/api/audit", params={"action": "file.delete"}).json()["items"]
    assert [(e["target"], e["details"]) for e in reversed(audit)] == [
        ("f.txt", {"kind": "file", "recursive": False}),
        ("empty", {"kind": "dir", "recursive": False}),
        ("toplink", {"kind": "symlink", "recursive": False}),
        ("full", {"kind": "dir", "recursive": True}),
    ]


# --- POST /api/files/search ----------------------------------------------------------------------


def _search(client: TestClient, **body: Any) -> dict[str, Any]:
    resp = client.post("/api/files/search", json=body)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


def _seed(settings: Settings, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = _ws(settings) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_search_plain_regex_glob_and_names(client: TestClient, settings: Settings) -> None:
    _seed(settings, {
        "src/app.py": b"import os\nprint('Hello')\r\nhello = 1\n",
        "src/lib/util.py": b"def hello():\n    return 'hello hello'\n",
        "README.md": b"# Hello project\n",
        "data/blob.bin": b"hello\x00binary",
        "notes.txt": "caf\u00e9 hello\n".encode(),
    })  # fmt: skip
    plain = _search(client, query="hello")
    assert plain == {
        "matches": [
            {"path": "notes.txt", "line": 1, "text": "caf\u00e9 hello"},
            {"path": "src/app.py", "line": 3, "text": "hello = 1"},
            {"path": "src/lib/util.py", "line": 1, "text": "def hello():"},
            {"path": "src/lib/util.py", "line": 2, "text": "    return 'hello hello'"},
        ],
        "truncated": False,
    }  # case-sensitive, one match per line, binary skipped, sorted by path
    regex = _search(client, query=r"(?i)^(#\s)?hello\b", regex=True)
    assert [(m["path"], m["line"]) for m in regex["matches"]] == [
        ("README.md", 1), ("src/app.py", 3),
    ]  # fmt: skip
    assert _search(client, query="Hello')$", regex=False)["matches"] == []
    crlf = _search(client, query=r"Hello'\)$", regex=True)["matches"]
    assert crlf == [{"path": "src/app.py", "line": 2, "text": "print('Hello')"}]
    by_name = _search(client, query="hello", glob="*.py")
    assert {m["path"] for m in by_name["matches"]} == {"src/app.py", "src/lib/util.py"}
    by_path = _search(client, query="hello", glob="src/*.py")  # '*' crosses folders
    assert {m["path"] for m in by_path["matches"]} == {"src/app.py", "src/lib/util.py"}
    assert _search(client, query="hello", glob="lib/*.py")["matches"] == []
    names = _search(client, query="", glob="*.bin")
    assert names == {"matches": [{"path": "data/blob.bin", "line": None, "text": None}],
                     "truncated": False}  # fmt: skip
    upper = _search(client, query="", glob="[!a-z]*")  # names, case-sensitive
    assert [m["path"] for m in upper["matches"]] == ["README.md"]


def test_binary_means_a_nul_byte_in_the_first_8_kib(client: TestClient, settings: Settings) -> None:
    _seed(settings, {
        "early.bin": b"needle\n" + b"\x00" + b"needle\n",
        "late.dat": b"a" * SNIFF_BYTES + b"\x00\nneedle\n",
        "empty.txt": b"",
    })  # fmt: skip
    found = _search(client, query="needle")["matches"]
    assert [(m["path"], m["line"]) for m in found] == [("late.dat", 2)]
    assert _search(client, query="^$", regex=True)["matches"] == []  # an empty file has no line


def test_search_skips_large_files_and_stops_at_max_results(
    data_dir: Path, fake: FakeSandbox
) -> None:
    with _app(data_dir, fake, search_file_max_bytes=1000) as c:
        settings: Settings = c.app.state.nox.settings  # type: ignore[attr-defined]
        _seed(settings, {"big.txt": b"needle\n" * 200, "small.txt": b"needle\n" * 3})
        found = _search(c, query="needle")
        assert [(m["path"], m["line"]) for m in found["matches"]] == [
            ("small.txt", 1), ("small.txt", 2), ("small.txt", 3),
        ]  # fmt: skip
        assert found["truncated"] is False
        by_name = _search(c, query="", glob="*.txt")  # found by name all the same
        assert [m["path"] for m in by_name["matches"]] == ["big.txt", "small.txt"]
        exact = _search(c, query="needle", max_results=3)
        assert (len(exact["matches"]), exact["truncated"]) == (3, False)
        cut = _search(c, query="needle", max_results=2)
        assert (len(cut["matches"]), cut["truncated"]) == (2, True)
        named = _search(c, query="", glob="*", max_results=1)
        assert (len(named["matches"]), named["truncated"]) == (1, True)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"query": "(", "regex": True}, 400, "invalid regular expression: missing ): ("),
        ({"query": "(?=a)b", "regex": True}, 400, "invalid perl operator: (?="),
        ({"query": r"(a)\1", "regex": True}, 400, "invalid escape sequence"),
        ({"query": "x{1000}" * 4, "regex": True}, 400, f"at most {MAX_PROGRAM_SIZE})"),
        ({"query": ""}, 400, "give a query, a glob, or both"),
        ({"query": "a\nb"}, 400, "line break"),
        ({"query": "x", "max_results": 1001}, 422, "max_results"),
        ({"query": "x", "max_results": 0}, 422, "max_results"),
        ({"query": "x" * 1001}, 422, "query"),
        ({"query": "x", "limit": 5}, 422, "limit"),
        ({"glob": "*"}, 422, "query"),
    ],
)
def test_search_refuses_bad_requests(
    client: TestClient, body: dict[str, Any], status: int, fragment: str
) -> None:
    resp = client.post("/api/files/search", json=body)
    message = _error(resp, status, "invalid_request")
    assert fragment in message


def test_a_catastrophic_pattern_on_a_long_line_finishes_fast(
    client: TestClient, settings: Settings
) -> None:
    _seed(settings, {"long.txt": b"a" * 60_000 + b"!\n", "x.txt": b"x" * 50_000 + b"\n"})
    started = time.monotonic()
    for pattern in (r"(a+)+$", r"(x+x+)+y", r"^(a|aa)+$", r"(.*a){12}$"):
        assert _search(client, query=pattern, regex=True)["matches"] == []
    assert time.monotonic() - started < 2.0


def test_long_lines_are_cut_around_the_match(client: TestClient, settings: Settings) -> None:
    line = b"x" * 5000 + b"NEEDLE" + b"y" * 5000
    far = b"z" * (REGEX_LINE_BYTES + 10) + b"FAR"
    _seed(settings, {"wide.txt": line + b"\n", "far.txt": far + b"\n"})
    for regex in (False, True):
        (match,) = _search(client, query="NEEDLE", regex=regex)["matches"]
        assert len(match["text"]) == TEXT_MAX_CHARS
        assert "NEEDLE" in match["text"]
        assert match["text"].startswith("x")
    # plain text finds a match anywhere in a line; a regular expression sees its first 64 KiB
    assert [m["path"] for m in _search(client, query="FAR")["matches"]] == ["far.txt"]
    assert _search(client, query="FAR", regex=True)["matches"] == []


def test_search_respects_its_time_budget(data_dir: Path, fake: FakeSandbox) -> None:
    with _app(data_dir, fake, search_timeout_s=0.02) as c:
        settings: Settings = c.app.state.nox.settings  # type: ignore[attr-defined]
        ws = _ws(settings)
        for i in range(50):  # many files
            folder = ws / f"d{i:02}"
            folder.mkdir()
            for j in range(100):
                (folder / f"f{j:03}.txt").write_bytes(b"some text without it\n" * 20)
        lines = b"abcdefgh\n" * (2 * MIB // 9)  # and long files: seconds of work in all
        for i in range(20):
            (ws / f"long{i:02}.txt").write_bytes(lines)
        for body in ({"query": "needle"}, {"query": "ne+dle", "regex": True}):
            started = time.monotonic()
            result = _search(c, **body)
            elapsed = time.monotonic() - started
            assert result == {"matches": [], "truncated": True}, body
            assert elapsed < 0.5, (body, elapsed)


def test_search_respects_its_byte_budget(data_dir: Path, fake: FakeSandbox) -> None:
    with _app(data_dir, fake, search_max_bytes=10_000) as c:
        settings: Settings = c.app.state.nox.settings  # type: ignore[attr-defined]
        _seed(settings, {f"f{i}.txt": b"needle\n" + b"." * 2993 for i in range(6)})
        result = _search(c, query="needle")
        assert [m["path"] for m in result["matches"]] == ["f0.txt", "f1.txt", "f2.txt"]
        assert result["truncated"] is True


def test_search_never_follows_links(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET + b"\n")
    (_ws(settings) / "dirlink").symlink_to(outside)
    (_ws(settings) / "filelink.txt").symlink_to(outside / "secret.txt")
    (_ws(settings) / "own.txt").write_bytes(b"nothing\n")
    assert _search(client, query=SECRET.decode()) == {"matches": [], "truncated": False}
    assert _search(client, query="", glob="*secret*")["matches"] == []
    assert _search(client, query="", glob="*link*")["matches"] == []  # links are not files


def test_only_the_upload_route_is_exempt_from_the_json_cap(
    client: TestClient, settings: Settings
) -> None:
    limit = client.app.state.nox.request_body_limit()  # type: ignore[attr-defined]
    assert limit < settings.max_upload_bytes
    big = client.put("/api/files/over-json-cap.bin", content=b"u" * (limit + 1))
    assert big.status_code == 201, big.text
    assert (_ws(settings) / "over-json-cap.bin").stat().st_size == limit + 1
    resp = client.post(
        "/api/files/search",
        content=json.dumps({"query": "x", "glob": "g" * limit}).encode(),
        headers={"content-type": "application/json"},
    )
    _error(resp, 413, "payload_too_large")


# --- roles and workspaces ------------------------------------------------------------------------


def test_roles_and_workspaces(
    client: TestClient, settings: Settings, make_token: Callable[..., str]
) -> None:
    _seed(settings, {"keep.txt": b"keep\n"})
    other = _ws(settings, "other")
    (other / "theirs.txt").write_bytes(SECRET + b"\n")
    viewer = _auth(make_token(Role.VIEWER))
    runner = _auth(make_token(Role.RUNNER))
    before = _tree(settings.workspaces_dir)
    assert client.get("/api/files/keep.txt", headers=viewer).content == b"keep\n"
    assert _search(client, query="keep")["matches"][0]["path"] == "keep.txt"
    _error(client.put("/api/files/new.txt", content=b"x", headers=viewer), 403, "forbidden")
    _error(client.delete("/api/files/keep.txt", headers=viewer), 403, "forbidden")
    for method, url, kwargs in (
        ("GET", "/api/files", {}),
        ("GET", "/api/files/theirs.txt", {}),
        ("PUT", "/api/files/theirs.txt", {"content": b"overwritten"}),
        ("DELETE", "/api/files/theirs.txt", {}),
        ("POST", "/api/files/search", {"json": {"query": "SECRET"}}),
    ):
        for who in (viewer, runner):
            resp = client.request(method, url, params={"workspace": "other"}, headers=who,
                                  **kwargs)  # fmt: skip
            if method in ("PUT", "DELETE") and who is viewer:
                _error(resp, 403, "forbidden")  # the role first
            else:
                assert (
                    _error(resp, 403, "forbidden") == "only an admin may act on another workspace"
                )
    assert _tree(settings.workspaces_dir) == before
    # an admin may act on another workspace
    mine = {"workspace": "other"}
    assert client.get("/api/files/theirs.txt", params=mine).content == SECRET + b"\n"
    listed = client.get("/api/files", params=mine).json()["entries"]
    assert [e["path"] for e in listed] == ["theirs.txt"]
    found = client.post("/api/files/search", params=mine, json={"query": "SENTINEL"}).json()
    assert found["matches"][0]["path"] == "theirs.txt"
    assert client.put("/api/files/new.txt", params=mine, content=b"n").status_code == 201
    assert (other / "new.txt").read_bytes() == b"n"
    assert client.delete("/api/files/new.txt", params=mine).status_code == 204
    assert not (other / "new.txt").exists()
    _error(client.get("/api/files", params={"workspace": "../etc"}), 400, "invalid_request")
    # reading a workspace never used finds it empty and leaves no trace
    ghost = {"workspace": "ghost"}
    empty = {"path": "", "entries": [], "truncated": False}
    assert client.get("/api/files", params=ghost).json() == empty
    _error(client.get("/api/files", params={**ghost, "path": "sub"}), 404, "not_found")
    assert _error(client.get("/api/files/x.txt", params=ghost), 404, "not_found") == (
        "x.txt does not exist"
    )
    _error(client.delete("/api/files/x.txt", params=ghost), 404, "not_found")
    found = client.post("/api/files/search", params=ghost, json={"query": "x"})
    assert found.json() == {"matches": [], "truncated": False}
    bad = client.post("/api/files/search", params=ghost, json={"query": "(", "regex": True})
    _error(bad, 400, "invalid_request")  # checked all the same
    assert not (settings.workspaces_dir / "ghost").exists()


# --- traversal, as raw HTTP through a real server -----------------------------------------------

# {absolute}: /etc/passwd for the routes that read; for those that write or delete, the absolute
# path of a sentinel file of the test's own, so that a regression fails the test, not the machine.
ATTEMPTS = [
    "../x",
    "../../etc/passwd",
    "a/../../x",
    "..",
    "%2e%2e",
    "%2e%2e%2fx",
    "..%2Fx",
    "%2e%2e/%2e%2e/etc/passwd",
    "..%2f..%2fsentinel.txt",
    "..%2fother%2fsecret.txt",
    "{absolute_encoded}",
    "{absolute}",
    "a%00b",
    "%00",
    "ok/..%2f..%2f..%2fx",
    "n" * 256,
    "a/" * 2100 + "x",
    "outlink/secret.txt",
]


_SERVER = textwrap.dedent(
    """
    import sys, uvicorn
    from nox_api.app import create_app
    from nox_api.config import load_settings
    from nox_api.engine.fake import FakeSandbox
    app = create_app(load_settings(pool_size=0), sandbox=FakeSandbox())
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    """
)


@contextlib.contextmanager
def _server(data_dir: Path, **env: str) -> Iterator[tuple[int, str, subprocess.Popen[bytes]]]:
    """A uvicorn server process on the fake sandbox and a runner token of 'default'."""
    settings = load_settings(data_dir=data_dir, pool_size=0)
    token = _token(settings, Role.RUNNER)
    port = free_port()
    # Rate limits that never refuse these tests (still counted on every request).
    policy = write_policy(data_dir, "rate_limits:\n  roles:\n    runner: 1000000/minute\n")
    environ = {**os.environ, "NOX_DATA_DIR": str(data_dir), "NOX_POLICY_FILE": str(policy), **env}
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], env=environ)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert proc.poll() is None, "the server process died"
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)
        yield port, token, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _raw(port: int, token: str, method: str, target: str, body: bytes | None = None
         ) -> tuple[int, bytes]:  # fmt: skip
    """One request with ``target`` sent as it is (no client normalises it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        if body is not None:
            headers["Content-Type"] = "application/json" if target.endswith("search") else (
                "application/octet-stream")  # fmt: skip
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, Path]]:
    root = Path(tmp_path_factory.mktemp("live"))
    root.chmod(0o711)
    data = root / "data"
    data.mkdir()
    with _server(data) as (port, token, _proc):
        settings = load_settings(data_dir=data)
        ws = settings.workspaces_dir / "default"
        other = settings.workspaces_dir / "other"
        other.mkdir(parents=True, exist_ok=True)
        (other / "secret.txt").write_bytes(SECRET)
        (data / "sentinel.txt").write_bytes(SECRET)
        (ws / "ok").mkdir(parents=True, exist_ok=True)
        (ws / "ok/inside.txt").write_bytes(b"inside")
        (ws / "outlink").symlink_to(other)
        yield port, token, data


def _outside(data: Path) -> dict[str, str]:
    """Everything a request must never change: the data folder but for the database, the
    audit log and the server log (which requests do write), and /etc/passwd."""
    tree = {
        k: v
        for k, v in _tree(data).items()
        if not k.startswith(("nox.db", "audit", "logs", "staging"))
    }
    tree["/etc/passwd"] = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    return tree


@pytest.mark.parametrize("route", ["list", "read", "put", "delete", "search"])
def test_traversal_attempts_are_refused_on_every_route(
    live: tuple[int, str, Path], route: str
) -> None:
    port, token, data = live
    before = _outside(data)
    absolute = "/etc/passwd" if route in ("list", "read", "search") else str(data / "sentinel.txt")
    for pattern in ATTEMPTS:
        attempt = pattern.replace("{absolute_encoded}", quote(absolute, safe="")).replace(
            "{absolute}", absolute
        )
        if route == "list":
            status, body = _raw(port, token, "GET", f"/api/files?path={attempt}&recursive=true")
        elif route == "read":
            status, body = _raw(port, token, "GET", f"/api/files/{attempt}")
        elif route == "put":
            status, body = _raw(port, token, "PUT", f"/api/files/{attempt}", b"EVIL")
        elif route == "delete":
            status, body = _raw(port, token, "DELETE", f"/api/files/{attempt}?recursive=true")
        else:
            query = json.dumps({"query": SECRET.decode(), "glob": attempt}).encode()
            status, body = _raw(port, token, "POST", "/api/files/search", query)
            assert status in (200, 422), (attempt, body)  # 422: a glob over 1000 characters
            assert SECRET not in body, attempt
            if status == 200:
                assert json.loads(body)["matches"] == [], attempt
            assert _outside(data) == before, (route, attempt)
            continue
        assert status in (400, 404), (route, attempt, status, body[:300])
        assert SECRET not in body, (route, attempt)
        assert b"root:" not in body, (route, attempt)
        if status == 400:
            assert json.loads(body)["error"]["code"] == "invalid_path", (route, attempt, body)
        assert _outside(data) == before, (route, attempt)
    assert _temp_files(data) == []


def test_raw_dot_dot_reaches_the_route_and_is_refused(live: tuple[int, str, Path]) -> None:
    """Through uvicorn, '..' in a URL is not normalised away: the resolver must refuse it."""
    port, token, data = live
    status, body = _raw(port, token, "GET", "/api/files/../../sentinel.txt")
    assert status == 400
    assert json.loads(body)["error"] == {
        "code": "invalid_path",
        "message": "the path '../../sentinel.txt' leaves the workspace",
        "request_id": json.loads(body)["error"]["request_id"],
    }
    assert _raw(port, token, "GET", "/api/files/ok/../ok/inside.txt") == (200, b"inside")
    # encoded twice: decoded once, a literal name inside the workspace
    status, body = _raw(port, token, "GET", "/api/files/%252e%252e%252fsentinel.txt")
    assert status == 404
    assert json.loads(body)["error"]["message"] == "%2e%2e%2fsentinel.txt does not exist"
    status, body = _raw(port, token, "PUT", "/api/files/ok/%252e%252e", b"literal")
    assert status == 201
    assert (data / "workspaces/default/ok/%2e%2e").read_bytes() == b"literal"
    # the workspace itself is no file: it can be listed, never deleted or written
    for target in (".", "./", "a/..", "ok/.."):
        for method in ("DELETE", "PUT", "GET"):
            status, body = _raw(port, token, method, f"/api/files/{target}?recursive=true",
                                b"x" if method == "PUT" else None)  # fmt: skip
            assert status == 400, (method, target, body)
            assert json.loads(body)["error"]["code"] == "invalid_path"
    assert (data / "workspaces/default/ok/inside.txt").read_bytes() == b"inside"


# --- a large file through a real server --------------------------------------------------------


def test_a_200_mib_file_goes_up_and_down_in_bounded_server_memory(data_dir: Path) -> None:
    size = 200 * MIB
    block = os.urandom(MIB)
    env = {"NOX_MAX_UPLOAD_BYTES": str(size)}
    with _server(data_dir, **env) as (port, token, proc):
        server = psutil.Process(proc.pid)
        base_url = f"http://127.0.0.1:{port}"
        headers = _auth(token)
        with httpx2.Client(base_url=base_url, headers=headers, timeout=60) as c:
            assert c.put("/api/files/warm", content=b"w" * MIB).status_code == 201
            assert c.get("/api/files/warm").content == b"w" * MIB
            baseline = server.memory_info().rss
            peak = [baseline]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.02):
                    peak[0] = max(peak[0], server.memory_info().rss)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                sent = hashlib.sha256()

                def body() -> Iterator[bytes]:
                    for i in range(size // MIB):
                        chunk = i.to_bytes(8, "big") + block[8:]  # no two blocks alike
                        sent.update(chunk)
                        yield chunk

                up = c.put("/api/files/big/file.bin", content=body(),
                           headers={"Content-Length": str(size)})  # fmt: skip
                assert up.status_code == 201, up.text
                assert up.json()["size"] == size
                assert up.json()["sha256"] == sent.hexdigest()
                got = hashlib.sha256()
                received = 0
                with c.stream("GET", "/api/files/big/file.bin") as down:
                    assert down.status_code == 200
                    assert down.headers["content-length"] == str(size)
                    for chunk in down.iter_bytes():
                        got.update(chunk)
                        received += len(chunk)
                assert received == size
                assert got.hexdigest() == sent.hexdigest()
            finally:
                stop.set()
                sampler.join()
        growth = (peak[0] - baseline) / MIB
        assert growth < 40, f"the server grew by {growth:.1f} MiB for a 200 MiB file"


def test_recursive_delete_never_opens_a_fifo_or_follows_a_link(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    """The tree remover enters folders with O_DIRECTORY|O_NOFOLLOW: a FIFO or a link where a
    folder was is unlinked, never opened (``shutil.rmtree`` would block on the FIFO)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(SECRET)
    top = _ws(settings) / "tree"
    deep = top
    for i in range(60):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "leaf.txt").write_bytes(b"leaf")
    os.mkfifo(top / "pipe")
    os.mkfifo(deep / "pipe")
    (top / "d0" / "to-outside").symlink_to(outside)
    (deep / "to-keep").symlink_to(outside / "keep.txt")
    began = time.monotonic()
    resp = client.delete("/api/files/tree", params={"recursive": "true"})
    assert resp.status_code == 204, resp.text
    assert time.monotonic() - began < 5
    assert not top.exists()
    assert (outside / "keep.txt").read_bytes() == SECRET


def test_remove_tree_refuses_past_its_depth_and_keeps_descriptors_bounded(tmp_path: Path) -> None:
    from nox_api.services.files import MAX_DEPTH, remove_tree

    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = os.dup(root)
        os.mkdir("t", dir_fd=fd)
        nxt = os.open("t", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
        for _ in range(MAX_DEPTH + 3):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.close(fd)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(OSError, match="folders deep"):
            remove_tree(root, "t")
        assert len(os.listdir("/proc/self/fd")) == before  # every descriptor closed again
        assert os.path.isdir(tmp_path / "t")
    finally:
        os.close(root)


def test_a_file_time_out_of_range_does_not_fail_the_listing(
    client: TestClient, settings: Settings
) -> None:
    """Sandboxed code can set a time datetime cannot hold (tmpfs keeps it); the listing and
    the read still answer, with the time clamped."""
    from nox_api.services.files import modified_at

    far = os.stat_result((0o100644, 0, 0, 1, 0, 0, 1, 0, 1e15, 0))
    assert modified_at(far).year == 9999
    before = os.stat_result((0o100644, 0, 0, 1, 0, 0, 1, 0, -1e15, 0))
    assert modified_at(before).year == 1
    (_ws(settings) / "ok.txt").write_bytes(b"ok")
    assert client.get("/api/files").status_code == 200


def test_a_regex_search_does_not_hold_every_line_of_a_file_at_once() -> None:
    """Review finding: splitting a file of short lines into a list cost ~14x its size."""
    import time as _time
    import tracemalloc

    from nox_api.services.file_search import _compile, _regex

    content = b"ab\n" * (1 << 17)  # 384 KiB of 3-byte lines
    find = _regex(_compile("never-there"))
    tracemalloc.start()
    try:
        assert list(find(content, _time.monotonic() + 60)) == []
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(content) // 4, peak  # a line at a time, not a list of them all
