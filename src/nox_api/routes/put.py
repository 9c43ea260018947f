"""``POST /put``: upload one file (multipart ``file``, optional field ``path``).

The body is parsed as it arrives on the event loop; the file part's bytes are gathered up to a
megabyte and written to a staging file with a size cap in a worker thread (a slow disk never
stalls the loop), so at most about a megabyte of an upload is held in memory. Its bytes are
held against the workspace's quotas as they come (:mod:`~nox_api.services.upload_quota`).
Nothing appears in the workspace until the whole upload succeeded, when one ``rename`` puts it
in place. A failed or cut upload leaves nothing behind.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from nox_api.deps import NoxDep, Runner, WorkspaceParam, target_workspace
from nox_api.errors import InvalidPath, InvalidRequest, PayloadTooLarge
from nox_api.services.files import StagedFile
from noxsdk.models import FileInfo

router = APIRouter(tags=["files"])

_MAX_FIELD_BYTES = 4096
_MULTIPART_OVERHEAD = 64 * 1024
_WRITE_BYTES = 1024 * 1024  # of the file part gathered before each write (off the loop)

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "path": {
                            "type": "string",
                            "description": "Target path in the workspace (default: the "
                            "file's name). Parent folders are created.",
                        },
                    },
                }
            }
        },
    }
}


class _Upload:
    """State of one multipart parse: which part we are in, the path field, the file part's
    bytes not written yet (:meth:`take` hands them over)."""

    def __init__(self) -> None:
        self.pending = bytearray()
        self.header_field = b""
        self.headers: dict[bytes, bytes] = {}
        self.part: str | None = None  # "file", "path"
        self.filename: str | None = None
        self.path_field = bytearray()
        self.files = 0
        self.complete = False  # the closing boundary arrived

    # python-multipart callbacks ----------------------------------------------------------
    def on_part_begin(self) -> None:
        self.headers = {}
        self.part = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        key = self.header_field.lower()
        self.headers[key] = self.headers.get(key, b"") + data[start:end]

    def on_header_end(self) -> None:
        self.header_field = b""

    def on_headers_finished(self) -> None:
        _value, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            self.files += 1
            if self.files > 1:
                raise InvalidRequest("send exactly one 'file' part per upload")
            self.part = "file"
            raw = params.get(b"filename")
            self.filename = raw.decode("utf-8", "replace") if raw else None
        elif name == "path":
            self.part = "path"
        else:
            raise InvalidRequest(
                f"unexpected form field {name[:60]!r}; expected 'file' and optionally 'path'"
            )

    def take(self) -> bytes:
        data = bytes(self.pending)
        self.pending.clear()
        return data

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part == "file":
            self.pending += data[start:end]
        elif self.part == "path":
            self.path_field += data[start:end]
            if len(self.path_field) > _MAX_FIELD_BYTES:
                raise InvalidPath(f"the 'path' field is longer than {_MAX_FIELD_BYTES} bytes")

    def on_end(self) -> None:
        self.complete = True

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_end": self.on_end,
        }


def _boundary(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise InvalidRequest(
            "send the file as multipart/form-data with a 'file' part (curl -F file=@NAME)"
        )
    return params[b"boundary"]


@router.post(
    "/put",
    status_code=status.HTTP_201_CREATED,
    response_model=FileInfo,
    openapi_extra=_UPLOAD_BODY,
    summary="Upload a file into the workspace",
    responses={
        400: {"description": "Bad form or invalid_path"},
        409: {"description": "The target is a folder"},
        413: {"description": "The file is above the server's upload limit"},
        429: {"description": "Rate limit, or the workspace's daily upload quota, reached"},
        507: {"description": "The workspace's storage quota is full"},
    },
)
async def put(
    request: Request, nox: NoxDep, caller: Runner, workspace: WorkspaceParam = None
) -> FileInfo:
    target_ws = target_workspace(caller, workspace)
    server_limit = nox.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isdigit()
        and int(declared) > server_limit + _MULTIPART_OVERHEAD
    ):
        raise PayloadTooLarge(f"the upload is larger than this server's {server_limit} bytes")
    parser_boundary = _boundary(request)
    # Walking the workspace and the database are blocking work: off the event loop. The file's
    # size is known only once the form is read: its bytes are held against the quotas as they
    # come (parallel uploads cannot pass a quota together).
    reservation = await run_in_threadpool(
        lambda: nox.uploads.reserve(target_ws, nox.workspaces.path(target_ws), size=None)
    )
    landed = False
    try:
        limit = min(server_limit, reservation.limit)
        with nox.workspaces.staged_upload(limit, reservation.grow) as writer:
            upload = _Upload()
            parser = MultipartParser(parser_boundary, upload.callbacks())  # type: ignore[arg-type]
            try:
                async for chunk in request.stream():
                    parser.write(chunk)
                    if len(upload.pending) >= _WRITE_BYTES:
                        await run_in_threadpool(writer.write, upload.take())
                parser.finalize()
                await run_in_threadpool(writer.write, upload.take())
            except ClientDisconnect:
                raise InvalidRequest("the client went away before the upload ended") from None
            except MultipartParseError as exc:
                raise InvalidRequest(f"the multipart body is malformed: {exc}") from None
            except PayloadTooLarge:
                if limit < server_limit:  # the quota, not the server's cap, stopped it
                    raise reservation.refused(limit) from None
                raise
            if not upload.complete:
                raise InvalidRequest("the upload ended before the closing multipart boundary")
            if upload.files == 0:
                raise InvalidRequest("the form has no 'file' part (curl -F file=@NAME)")
            target = upload.path_field.decode("utf-8", "replace") or upload.filename
            if not target:
                raise InvalidRequest(
                    "the file part has no name: give the target in the 'path' field"
                )
            # fsync and rename: blocking work, off the event loop
            staged: StagedFile = await run_in_threadpool(writer.finish)
            info = await run_in_threadpool(nox.workspaces.commit, target_ws, target, staged)
        await run_in_threadpool(nox.record_upload, caller, target_ws, info)
        landed = True
    finally:
        await run_in_threadpool(reservation.release, landed)
    return info
