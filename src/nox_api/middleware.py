"""Pure ASGI middleware (no per-request task or buffering overhead)."""

from __future__ import annotations

import json
from collections.abc import Callable

from asgi_correlation_id import correlation_id
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimitMiddleware"]


class BodyLimitMiddleware:
    """Refuse request bodies above ``limit`` bytes with 413 before they are buffered.

    JSON routes read the whole body into memory before validating it, so without this a client
    could make the server hold any amount. Streaming upload routes enforce their own, larger
    caps while writing to disk: ``exempt`` holds their ``(method, path prefix)`` pairs, so that
    another method on the same prefix (``POST /api/files/search``) stays capped.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int | Callable[[], int],
        exempt: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.app = app
        self._limit = limit
        self.exempt = exempt

    @property
    def limit(self) -> int:
        """The cap now: a callable follows the policy as it is reloaded."""
        return self._limit() if callable(self._limit) else self._limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        limit = self.limit
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await self._refuse(send)
                    return
        seen = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Answer 413 now; the app then sees a disconnect and its answer is dropped.
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    def _exempt(self, scope: Scope) -> bool:
        method, path = scope["method"], scope["path"]
        return any(method == m and path.startswith(prefix) for m, prefix in self.exempt)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": {
                    "code": "payload_too_large",
                    "message": f"the request body is larger than this server's {self.limit} bytes",
                    "request_id": correlation_id.get(),
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
