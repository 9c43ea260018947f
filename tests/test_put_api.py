"""/put on the fake sandbox: streaming, atomic, path checks. Real files on disk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox


def _ws(settings: Settings) -> Path:
    return settings.workspaces_dir / "default"


def _everything(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_upload_writes_the_file_and_answers_its_info(
    client: TestClient, settings: Settings
) -> None:
    data = os.urandom(300_000)
    resp = client.post("/put", files={"file": ("blob.bin", data)}, data={"path": "in/deep/b.bin"})
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert info["path"] == "in/deep/b.bin"
    assert info["name"] == "b.bin"
    assert info["type"] == "file"
    assert info["size"] == len(data)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert (_ws(settings) / "in/deep/b.bin").read_bytes() == data
    assert list(settings.staging_dir.iterdir()) == []


def test_default_target_is_the_file_name_and_overwrite_works(
    client: TestClient, settings: Settings
) -> None:
    assert client.post("/put", files={"file": ("notes.txt", b"one")}).status_code == 201
    assert client.post("/put", files={"file": ("notes.txt", b"two")}).status_code == 201
    assert (_ws(settings) / "notes.txt").read_bytes() == b"two"


def test_uploaded_files_belong_to_the_sandbox_user(client: TestClient, settings: Settings) -> None:
    client.post("/put", files={"file": ("x.txt", b"x")}, data={"path": "d/x.txt"})
    if os.geteuid() != 0:
        pytest.skip("ownership is only changed when the server runs as root")
    for path in (_ws(settings) / "d", _ws(settings) / "d/x.txt"):
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)


@pytest.mark.parametrize(
    "target",
    [
        "../x",
        "a/../../x",
        "/etc/passwd",
        "//etc/passwd",
        "a/\x00b",
        "..",
        ".",
        "a/..",
        "x" * 256,
        "a/" * 2100,
    ],
)
def test_bad_paths_are_invalid_path_and_write_nothing(
    client: TestClient, settings: Settings, target: str
) -> None:
    before = _everything(settings.data_path)
    resp = client.post("/put", files={"file": ("f.txt", b"payload")}, data={"path": target})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_path"
    assert _everything(settings.data_path) == before


def test_bad_file_names_are_refused_too(client: TestClient, settings: Settings) -> None:
    resp = client.post("/put", files={"file": ("../../escape.txt", b"x")})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_path"
    assert not (settings.data_path.parent / "escape.txt").exists()


def test_dot_dot_inside_the_workspace_is_fine(client: TestClient, settings: Settings) -> None:
    resp = client.post("/put", files={"file": ("f", b"x")}, data={"path": "a/b/../c.txt"})
    assert resp.status_code == 201
    assert resp.json()["path"] == "a/c.txt"
    encoded = client.post("/put", files={"file": ("f", b"y")}, data={"path": "%2e%2e/z"})
    assert encoded.status_code == 201  # a literal name, inside the workspace
    assert (_ws(settings) / "%2e%2e/z").read_bytes() == b"y"


def test_symlinks_in_the_path_are_never_followed(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    client.post("/put", files={"file": ("seed", b"s")})  # creates the workspace
    outside = tmp_path / "outside"
    outside.mkdir()
    (_ws(settings) / "link").symlink_to(outside)
    resp = client.post("/put", files={"file": ("p", b"evil")}, data={"path": "link/p"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_path"
    assert list(outside.iterdir()) == []


def test_a_symlink_as_the_target_is_replaced_not_written_through(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    client.post("/put", files={"file": ("seed", b"s")})
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    (_ws(settings) / "target").symlink_to(victim)
    resp = client.post("/put", files={"file": ("p", b"new")}, data={"path": "target"})
    assert resp.status_code == 201
    assert victim.read_text() == "original"
    assert not (_ws(settings) / "target").is_symlink()
    assert (_ws(settings) / "target").read_bytes() == b"new"


def test_a_folder_as_the_target_is_409(client: TestClient, settings: Settings) -> None:
    client.post("/put", files={"file": ("f", b"x")}, data={"path": "dir/inner.txt"})
    resp = client.post("/put", files={"file": ("f", b"x")}, data={"path": "dir"})
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "conflict"
    assert (_ws(settings) / "dir/inner.txt").exists()


def test_a_file_in_the_middle_of_the_path_is_invalid(client: TestClient) -> None:
    client.post("/put", files={"file": ("f", b"x")}, data={"path": "plain"})
    resp = client.post("/put", files={"file": ("f", b"x")}, data={"path": "plain/child"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_path"


def test_too_large_upload_is_413_and_leaves_nothing(
    data_dir: Path, fake: FakeSandbox, make_token
) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings(data_dir=data_dir, max_upload_bytes=100_000, pool_size=0)
    with TestClient(create_app(settings, sandbox=fake)) as c:
        auth = {"Authorization": f"Bearer {make_token()}"}
        resp = c.post("/put", files={"file": ("big", b"x" * 100_001)}, headers=auth)
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "payload_too_large"
        huge = c.post("/put", files={"file": ("big", b"x" * 300_000)}, headers=auth)
        assert huge.status_code == 413  # refused on its Content-Length
        assert list(settings.staging_dir.iterdir()) == []
        assert not (settings.workspaces_dir / "default" / "big").exists()
        ok = c.post("/put", files={"file": ("big", b"x" * 100_000)}, headers=auth)
        assert ok.status_code == 201


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"data": {"path": "x"}}, "multipart/form-data"),
        ({"files": {"other": ("f", b"x")}}, "unexpected form field 'other'"),
        ({"files": [("file", ("a", b"1")), ("file", ("b", b"2"))]}, "exactly one"),
        ({"files": {"file": ("", b"x")}}, "give the target in the 'path' field"),
        ({"data": {"path": "x"}, "files": {}}, "multipart/form-data"),
        ({"content": b"plain", "headers": {"content-type": "text/plain"}}, "multipart"),
    ],
)
def test_malformed_forms_are_400_and_leave_nothing(
    client: TestClient, settings: Settings, kwargs: dict[str, object], fragment: str
) -> None:
    resp = client.post("/put", **kwargs)  # type: ignore[arg-type]
    assert resp.status_code == 400, resp.text
    assert fragment in resp.json()["error"]["message"]
    assert list(settings.staging_dir.iterdir()) == []


def test_a_cut_upload_leaves_nothing(client: TestClient, settings: Settings) -> None:
    boundary = "XyZ"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cut.bin"\r\n\r\n'
    ).encode() + b"A" * 50_000  # no closing boundary
    resp = client.post(
        "/put", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert resp.status_code == 400
    assert list(settings.staging_dir.iterdir()) == []
    assert not (_ws(settings) / "cut.bin").exists()
