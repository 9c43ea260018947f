"""The Files page: browse the workspace's folders, view a text file, download, upload (several
files at once, by drag and drop or the file picker, with progress), delete with confirmation.

Writes go through the API's own handlers (``routes/files.py``), so uploads stream to disk with
the same size cap, quotas and audit records (``file.upload``, ``file.delete``) as the API's.
"""

from __future__ import annotations

import os
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from nox_api.deps import NoxDep
from nox_api.routes import files as api_files
from nox_api.services.files import MAX_PATH_CHARS, split_path
from nox_api.ui.access import RunnerUser, Uploader, User, Viewer
from nox_api.ui.render import is_htmx, render
from nox_api.ui.routing import UiRoute
from noxsdk.models import FileInfo, FileList

__all__ = ["router"]

router = APIRouter(route_class=UiRoute, include_in_schema=False)

_PATH_MAX = MAX_PATH_CHARS
PathQuery = Annotated[str, Query(max_length=_PATH_MAX)]


def _folder_parts(path: str) -> list[str]:
    return split_path(path, root=True)


def _crumbs(parts: list[str]) -> list[tuple[str, str]]:
    """(name, path) of each folder from the workspace down to ``parts``."""
    return [(name, "/".join(parts[: i + 1])) for i, name in enumerate(parts)]


def _sorted(listing: FileList) -> list[FileInfo]:
    return sorted(listing.entries, key=lambda e: (e.type != "dir", e.name.lower(), e.name))


def _list_context(nox: NoxDep, user: User, path: str) -> dict[str, Any]:
    parts = _folder_parts(path)
    folder = "/".join(parts)
    listing = nox.files.listing(user.principal.workspace, folder, False)
    return {
        "folder": folder,
        "crumbs": _crumbs(parts),
        "parent": "/".join(parts[:-1]) if parts else None,
        "entries": _sorted(listing),
        "truncated": listing.truncated,
        "workspace": user.principal.workspace,
    }


@router.get("/ui/files")
def files_page(request: Request, nox: NoxDep, user: Viewer, path: PathQuery = "") -> Response:
    context = _list_context(nox, user, path)
    return render(
        request,
        "files.html",
        user,
        nav="files",
        max_upload_bytes=nox.settings.max_upload_bytes,
        **context,
    )


@router.get("/ui/files/list")
def files_list(request: Request, nox: NoxDep, user: Viewer, path: PathQuery = "") -> Response:
    """The folder's table alone (htmx refreshes it after uploads)."""
    return render(request, "_files_list.html", user, **_list_context(nox, user, path))


def _read_head(fd: int, size: int, limit: int) -> bytes:
    wanted = min(size, limit)
    chunks: list[bytes] = []
    got = 0
    try:
        while got < wanted:
            chunk = os.pread(fd, wanted - got, got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _as_text(data: bytes, cut: bool) -> str | None:
    """The bytes as text, or None when they look binary (a NUL byte, or not UTF-8). A cut may
    split a character at the end: that part is dropped."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cut and exc.start >= len(data) - 3:
            return data[: exc.start].decode("utf-8")
        return None


@router.get("/ui/files/view")
def view_file(request: Request, nox: NoxDep, user: Viewer, path: PathQuery) -> Response:
    limit = nox.settings.ui_view_max_bytes
    opened = nox.files.open(user.principal.workspace, path)
    data = _read_head(opened.fd, opened.size, limit)
    cut = opened.size > len(data)
    parts = opened.path.split("/")
    return render(
        request,
        "file_view.html",
        user,
        nav="files",
        file=opened,
        text=_as_text(data, cut),
        cut=cut,
        shown=len(data),
        crumbs=_crumbs(parts[:-1]),
        folder="/".join(parts[:-1]),
    )


@router.get("/ui/files/download")
async def download_file(request: Request, nox: NoxDep, user: Viewer, path: PathQuery) -> Response:
    """The file's bytes as an attachment, as ``GET /api/files/{path}`` sends them."""
    return await api_files.read_file(path, nox, user.caller, Response())


@router.post("/ui/files/delete")
def delete_file(
    request: Request,
    nox: NoxDep,
    user: RunnerUser,
    path: Annotated[str, Form(max_length=_PATH_MAX)],
    recursive: Annotated[bool, Form()] = False,
) -> Response:
    parts = split_path(path)
    folder = "/".join(parts[:-1])
    api_files.delete_file(path, nox, user.caller, recursive)
    if not is_htmx(request):
        return RedirectResponse(f"/ui/files?path={quote(folder)}", status_code=303)
    context = _list_context(nox, user, folder)
    return render(
        request, "_files_list.html", user, notice=f"Deleted {'/'.join(parts)}.", **context
    )


@router.put("/ui/files/upload/{path:path}")
async def upload_file(path: str, request: Request, nox: NoxDep, user: Uploader) -> Response:
    """One file's bytes as the body (the page's script sends each dropped file so, with its
    progress): ``PUT /api/files/{path}`` behind the session."""
    info = await api_files.write_file(path, request, nox, user.caller)
    return JSONResponse(info.model_dump(mode="json", exclude_none=True), status_code=201)
