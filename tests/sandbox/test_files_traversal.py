"""Symbolic links made by sandboxed code, on the real bubblewrap sandbox: the Files API never
follows one, whether it points at /etc, at another workspace as the sandbox sees it, or climbs to
another workspace's folder as the host sees it; not even while a run swaps a folder for a link
over and over as the API reads it."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nox_api.config import Settings

from ._helpers import run_py

pytestmark = pytest.mark.sandbox

SECRET = b"OTHER-WORKSPACE-SECRET-0xBADC0DE"

MAKE_LINKS = """
import os
os.symlink('/etc', 'etc_link')
os.symlink('/workspace/../other', 'ws_link')
os.symlink('../other', 'rel_link')
os.symlink('../other/secret.txt', 'rel_file_link')
os.symlink('/etc/passwd', 'passwd_link')
os.makedirs('real/dir')
os.symlink('../../../other', 'real/dir/deep_link')
with open('real/dir/own.txt', 'w') as f:
    f.write('own needle\\n')
print(sorted(os.listdir('.')))
"""

# folder links -> (a name below them to read, one to delete): names that exist where the links
# point as the host sees it, but never a file of the machine's own to delete (should the code
# regress, the test must fail, not remove /etc/passwd)
FOLDER_LINKS = {
    "etc_link": ("passwd", "nox-test-no-such-file"),
    "ws_link": ("secret.txt", "secret.txt"),
    "rel_link": ("secret.txt", "secret.txt"),
    "real/dir/deep_link": ("secret.txt", "secret.txt"),
}
FILE_LINKS = ["rel_file_link", "passwd_link"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = _digest(path) if path.is_file() else "dir"
    return found


def _code(resp: object) -> tuple[int, str | None]:
    status: int = resp.status_code  # type: ignore[attr-defined]
    try:
        code = resp.json()["error"]["code"]  # type: ignore[attr-defined]
    except (ValueError, KeyError, TypeError):
        code = None
    return status, code


@pytest.fixture
def linked(bwrap_client: TestClient, bwrap_settings: Settings) -> dict[str, str]:
    """The other workspace with its secret, a sentinel in the data folder, and the links a run
    made in the default workspace. Returns what must never change."""
    c = bwrap_client
    put = c.put("/api/files/secret.txt", params={"workspace": "other"}, content=SECRET + b"\n")
    assert put.status_code == 201, put.text
    (bwrap_settings.data_path / "sentinel.txt").write_bytes(SECRET)
    made = run_py(c, MAKE_LINKS)
    assert made["status"] == "ok", made["stderr"]
    assert "etc_link" in made["stdout"]
    ws = bwrap_settings.workspaces_dir / "default"
    assert os.readlink(ws / "rel_link") == "../other"  # as the host sees it: another workspace
    assert (ws / "rel_link" / "secret.txt").read_bytes() == SECRET + b"\n"
    return _guarded(bwrap_settings)


def _guarded(settings: Settings) -> dict[str, str]:
    guarded = {f"other/{k}": v for k, v in _tree(settings.workspaces_dir / "other").items()}
    guarded["sentinel"] = _digest(settings.data_path / "sentinel.txt")
    guarded["/etc/passwd"] = _digest(Path("/etc/passwd"))
    guarded["/etc listing"] = ",".join(sorted(os.listdir("/etc")))
    return guarded


def test_links_made_by_a_run_are_never_followed(
    bwrap_client: TestClient, bwrap_settings: Settings, linked: dict[str, str]
) -> None:
    c = bwrap_client
    planted = Path("/etc/nox-test-planted.txt")
    for link, (read, gone) in FOLDER_LINKS.items():
        try:
            requests: list[tuple[str, str, dict[str, object]]] = [
                ("GET", f"/api/files/{link}/{read}", {}),  # read through it
                ("GET", "/api/files", {"params": {"path": link}}),  # list into it
                ("GET", "/api/files", {"params": {"path": f"{link}/x", "recursive": "true"}}),
                ("PUT", f"/api/files/{link}/{planted.name}", {"content": b"EVIL"}),  # write
                ("PUT", f"/api/files/{link}/nox-test-new/x.txt", {"content": b"EVIL"}),
                ("DELETE", f"/api/files/{link}/{gone}", {}),  # delete through it
                ("DELETE", f"/api/files/{link}/{gone}", {"params": {"recursive": "true"}}),
            ]
            for method, url, kwargs in requests:  # one at a time: the first to get through stops
                resp = c.request(method, url, **kwargs)  # type: ignore[arg-type]
                assert _code(resp) == (400, "invalid_path"), (link, resp.request.url, resp.text)
                assert SECRET not in resp.content
                assert b"root:" not in resp.content
        finally:  # should a write have got through, leave the machine as it was
            planted.unlink(missing_ok=True)
            if Path("/etc/nox-test-new").is_dir():
                shutil.rmtree("/etc/nox-test-new")
        assert not planted.exists()
    for link in FILE_LINKS:
        resp = c.get(f"/api/files/{link}")
        assert _code(resp) == (400, "invalid_path"), (link, resp.text)
        assert "symbolic link" in resp.json()["error"]["message"]
    assert _guarded(bwrap_settings) == linked

    # never searched into, never listed below
    for body in (
        {"query": SECRET.decode()},
        {"query": "root:"},
        {"query": "root:.*:0:", "regex": True},
        {"query": "", "glob": "*secret*"},
        {"query": "", "glob": "*passwd*"},
    ):
        result = c.post("/api/files/search", json=body).json()
        assert result == {"matches": [], "truncated": False}, body
    own = c.post("/api/files/search", json={"query": "own needle"}).json()
    assert own["matches"] == [{"path": "real/dir/own.txt", "line": 1, "text": "own needle"}]
    entries = c.get("/api/files", params={"recursive": "true"}).json()["entries"]
    kinds = {e["path"]: e["type"] for e in entries}
    assert kinds == {
        "etc_link": "symlink", "passwd_link": "symlink", "real": "dir", "real/dir": "dir",
        "real/dir/deep_link": "symlink", "real/dir/own.txt": "file", "rel_file_link": "symlink",
        "rel_link": "symlink", "ws_link": "symlink",
    }  # fmt: skip
    assert _guarded(bwrap_settings) == linked


def test_writing_or_deleting_a_link_changes_the_link_only(
    bwrap_client: TestClient, bwrap_settings: Settings, linked: dict[str, str]
) -> None:
    c = bwrap_client
    ws = bwrap_settings.workspaces_dir / "default"
    assert c.put("/api/files/rel_file_link", content=b"replaced").status_code == 201
    assert not (ws / "rel_file_link").is_symlink()
    assert (ws / "rel_file_link").read_bytes() == b"replaced"
    assert c.delete("/api/files/rel_link").status_code == 204
    assert c.delete("/api/files/etc_link", params={"recursive": "true"}).status_code == 204
    assert c.delete("/api/files/real", params={"recursive": "true"}).status_code == 204
    assert not (ws / "real").exists()
    assert not (ws / "rel_link").is_symlink()
    assert _guarded(bwrap_settings) == linked
    # what the run sees agrees: its links are gone, the file it wrote through is its own now
    seen = run_py(c, "import os; print(sorted(os.listdir('.')))")
    assert seen["stdout"].strip() == "['passwd_link', 'rel_file_link', 'ws_link']"


SWAPPER = """
import os, shutil, time
os.makedirs('swap', exist_ok=True)  # an upload may have made it already
for _ in range(200):  # a folder an upload just made is the server's until it hands it over
    try:
        with open('swap/f.txt', 'w') as f:
            f.write('inside')
        break
    except PermissionError:
        time.sleep(0.005)
os.symlink('../other', 'swap.link')  # the host sees the other workspace through it
end = time.monotonic() + 2.0
swaps = repairs = 0
while time.monotonic() < end:
    try:
        os.rename('swap', 'swap.dir')
        os.rename('swap.link', 'swap')  # 'swap' is the link now
        os.rename('swap', 'swap.link')
        os.rename('swap.dir', 'swap')  # and the folder again
        swaps += 1
    except OSError:  # an upload made a 'swap' folder in a gap: put things back
        repairs += 1
        try:  # uploads go on meanwhile: a repair that loses a race is tried again
            if os.path.islink('swap'):
                os.rename('swap', 'swap.link')
            elif os.path.isdir('swap') and os.path.isdir('swap.dir'):
                shutil.rmtree('swap')
            if not os.path.lexists('swap') and os.path.isdir('swap.dir'):
                os.rename('swap.dir', 'swap')
            if not os.path.lexists('swap.link'):
                os.symlink('../other', 'swap.link')
        except OSError:
            pass
print(swaps, repairs)
"""


def test_a_folder_swapped_for_a_link_during_requests_never_leads_out(
    bwrap_client: TestClient, bwrap_settings: Settings
) -> None:
    c = bwrap_client
    planted = c.put("/api/files/f.txt", params={"workspace": "other"}, content=SECRET)
    assert planted.status_code == 201
    (bwrap_settings.data_path / "sentinel.txt").write_bytes(SECRET)
    guarded = _guarded(bwrap_settings)
    outcomes: dict[tuple[str, int, str | None], int] = {}
    done = threading.Event()
    result: dict[str, object] = {}

    def swap() -> None:
        try:
            result["run"] = run_py(c, SWAPPER)
        finally:
            done.set()

    runner = threading.Thread(target=swap)
    runner.start()
    requests = 0
    try:
        while not done.is_set() and requests < 3000:
            for kind, resp in (
                ("read", c.get("/api/files/swap/f.txt")),
                ("list", c.get("/api/files", params={"path": "swap"})),
                ("write", c.put("/api/files/swap/planted.txt", content=b"EVIL")),
                ("search", c.post("/api/files/search", json={"query": SECRET.decode()})),
            ):
                requests += 1
                assert SECRET not in resp.content, kind
                key = (kind, *_code(resp))
                outcomes[key] = outcomes.get(key, 0) + 1
                if kind == "search" and resp.status_code == 200:
                    assert resp.json()["matches"] == []
    finally:  # the run ends within its 2 s either way; the client must outlive it
        runner.join(timeout=30)
    run = result["run"]
    assert isinstance(run, dict)
    assert run["status"] == "ok", run["stderr"]
    swaps, _repairs = (int(n) for n in str(run["stdout"]).split())
    assert swaps > 100  # the swap really raced the requests
    assert not (bwrap_settings.workspaces_dir / "other" / "planted.txt").exists()
    assert _guarded(bwrap_settings) == guarded
    # every answer was one of: the folder's own file, a refusal of the link, or not there
    # (or the admin's rate limit, 600/minute, which this many requests in 2 s may reach)
    allowed = {200, 201, 400, 404, 409, 429}
    assert {status for (_kind, status, _code) in outcomes} <= allowed, outcomes
    assert requests > 20, outcomes
