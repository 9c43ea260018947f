"""The Files API (API.md "Files"): list, read, write, delete and search a workspace's files.

Viewers read and search, runners also write and delete, always in their token's workspace; an
admin may name another with ``?workspace=``. Paths are resolved by
:class:`~nox_api.services.workspace_files.WorkspaceFiles`, which never follows a symbolic link.
Reads and writes stream: neither a download nor an upload is ever held in memory.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from anyio import to_thread
from fastapi import APIRouter, Request, Response, status
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nox_api.deps import NoxDep, Reader, Runner, WorkspaceParam, target_workspace
from nox_api.errors import InvalidRequest, PayloadTooLarge
from nox_api.services.workspace_files import FileUpload, OpenFile
from noxsdk.models import FileInfo, FileList, FileSearch, FileSearchResult

__all__ = ["router"]

router = APIRouter(tags=["files"])

_CHUNK_BYTES = 256 * 1024  # read from disk per step of a download
_WRITE_BYTES = 1024 * 1024  # gathered from the network before each write of an upload

_BAD_PATH = (
    "invalid_path (absolute, '..' leaving the workspace, NUL, too long, a symbolic link on "
    "the way) or another bad request"
)
_COMMON: dict[int | str, dict[str, Any]] = {
    400: {"description": _BAD_PATH},
    401: {"description": "Missing or unknown token"},
    403: {"description": "The role may not do this, or another workspace without admin"},
    404: {"description": "No such file or folder"},
    429: {"description": "Rate limit reached"},
}
_NO_404 = {status: text for status, text in _COMMON.items() if status != 404}
_RAW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The file's bytes, sent as they are (any Content-Type).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get(
    "/api/files",
    response_model=FileList,
    responses=_COMMON,
    summary="List a folder of the workspace (or its whole tree with recursive=true)",
)
def list_files(
    nox: NoxDep,
    caller: Reader,
    response: Response,
    *,
    path: str = "",
    recursive: bool = False,
    workspace: WorkspaceParam = None,
) -> Response:
    listing = nox.files.listing(target_workspace(caller, workspace), path, recursive)
    # Serialised here, once: FastAPI would turn the model into dicts and validate them again,
    # which costs more than the walk itself for a tree of 10,000 files.
    return Response(
        listing.model_dump_json(exclude_none=True),
        media_type="application/json",
        headers=dict(response.headers),  # X-RateLimit-* set by the caller's dependency
    )


@router.post(
    "/api/files/search",
    response_model=FileSearchResult,
    responses=_NO_404,
    summary="Search file contents line by line, or file names by glob",
)
def search_files(
    body: FileSearch, nox: NoxDep, caller: Reader, workspace: WorkspaceParam = None
) -> FileSearchResult:
    return nox.files.search(target_workspace(caller, workspace), body)


class _FileStream(StreamingResponse):
    """The bytes of an open file, read in steps off the event loop; the file is closed when
    the answer ends, however it ends."""

    def __init__(self, opened: OpenFile, headers: dict[str, str]) -> None:
        self._fd = opened.fd
        super().__init__(_chunks(opened.fd, opened.size), headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            os.close(self._fd)


async def _chunks(fd: int, size: int) -> AsyncIterator[bytes]:
    """At most ``size`` bytes (the Content-Length sent). A file cut short meanwhile ends the
    answer early, and the server closes the connection: the client sees a short body."""
    offset = 0
    while offset < size:
        chunk = await to_thread.run_sync(os.pread, fd, min(_CHUNK_BYTES, size - offset), offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


@router.get(
    "/api/files/{path:path}",
    response_class=Response,
    responses={
        **_COMMON,
        200: {"description": "The file's bytes", "content": {"application/octet-stream": {}}},
    },
    summary="Download a file (streamed; Content-Type guessed from its name)",
)
async def read_file(
    path: str, nox: NoxDep, caller: Reader, response: Response, workspace: WorkspaceParam = None
) -> Response:
    target_ws = target_workspace(caller, workspace)
    opened = await run_in_threadpool(nox.files.open, target_ws, path)
    media_type = mimetypes.guess_type(opened.name)[0] or "application/octet-stream"
    headers = {
        **response.headers,  # X-RateLimit-* set by the caller's dependency
        "content-type": media_type,
        "content-length": str(opened.size),
        "content-disposition": f"attachment; filename*=UTF-8''{quote(opened.name, safe='')}",
        "x-content-type-options": "nosniff",
        "content-security-policy": "default-src 'none'; sandbox",
        "last-modified": opened.modified.strftime("%a, %d %b %Y %H:%M:%S GMT"),
    }
    return _FileStream(opened, headers)


@router.put(
    "/api/files/{path:path}",
    status_code=status.HTTP_201_CREATED,
    response_model=FileInfo,
    openapi_extra=_RAW_BODY,
    responses={
        **_NO_404,
        409: {"description": "The target is a folder"},
        413: {"description": "The file is above the server's upload limit"},
        429: {"description": "Rate limit, or the workspace's daily upload quota, reached"},
        507: {"description": "The workspace's storage quota is full"},
    },
    summary="Upload a file (raw body); parent folders are created, a file there is replaced",
)
async def write_file(
    path: str, request: Request, nox: NoxDep, caller: Runner, workspace: WorkspaceParam = None
) -> FileInfo:
    target_ws = target_workspace(caller, workspace)
    server_limit = nox.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    if size is not None and size > server_limit:
        raise PayloadTooLarge(f"the file is larger than this server's {server_limit} bytes")
    # The declared size is held against the quotas before a byte is written (else each write
    # holds what it adds): parallel uploads cannot pass a quota together.
    reservation = await run_in_threadpool(
        lambda: nox.uploads.reserve(
            target_ws,
            nox.workspaces.path(target_ws),
            size=size,
            replaced=nox.files.replaced_bytes(target_ws, path),
        )
    )
    landed = False
    try:
        limit = min(server_limit, reservation.limit)
        upload = await run_in_threadpool(nox.files.upload, target_ws, path, limit, reservation.grow)
        try:
            try:
                await _receive(request, upload)
            except PayloadTooLarge:
                if limit < server_limit:  # the quota, not the server's cap, stopped it
                    raise reservation.refused(limit) from None
                raise
            info = await run_in_threadpool(upload.commit)
        finally:
            await run_in_threadpool(upload.abort)
        await run_in_threadpool(nox.record_upload, caller, target_ws, info)
        landed = True
    finally:
        await run_in_threadpool(reservation.release, landed)
    return info


async def _receive(request: Request, upload: FileUpload) -> None:
    """Copy the body to the upload, writing a megabyte at a time off the event loop."""
    pending = bytearray()
    try:
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= _WRITE_BYTES:
                await run_in_threadpool(upload.write, bytes(pending))
                pending.clear()
    except ClientDisconnect:
        raise InvalidRequest("the client went away before the upload ended") from None
    await run_in_threadpool(upload.write, bytes(pending))


@router.delete(
    "/api/files/{path:path}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={**_COMMON, 409: {"description": "A folder that is not empty, without recursive"}},
    summary="Delete a file, a link (never what it points to) or a folder",
)
def delete_file(
    path: str,
    nox: NoxDep,
    caller: Runner,
    recursive: bool = False,
    workspace: WorkspaceParam = None,
) -> None:
    # Returns None, not a Response: FastAPI keeps the X-RateLimit-* headers then.
    target_ws = target_workspace(caller, workspace)
    removed, kind = nox.files.delete(target_ws, path, recursive)
    nox.stats.mark_dirty(target_ws)
    nox.auditor.record(
        "file.delete", caller, workspace=target_ws, target=removed, kind=kind, recursive=recursive
    )
