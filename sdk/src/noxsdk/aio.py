""":class:`AsyncNoxClient`, the asyncio client of the Nox HTTP API.

The same methods as :class:`~noxsdk.NoxClient`, awaited; one client serves many concurrent
calls. Only how a request is sent and a wait is slept differs: the calls, answers, errors and
retries are those of ``noxsdk._core``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self, TypeVar, Unpack

import httpx2

from noxsdk import _routes as routes
from noxsdk._config import ClientOptions, resolve
from noxsdk._core import Exchange
from noxsdk._endpoints import Endpoints
from noxsdk._routes import Call
from noxsdk._streams import Destination, Sink, content_length, log_line
from noxsdk._upload import CHUNK_BYTES, Progress

__all__ = ["AsyncNoxClient"]

T = TypeVar("T")


class AsyncNoxClient(Endpoints):
    """An asyncio connection to a Nox server; arguments as :class:`~noxsdk.NoxClient`
    (``transport`` is an ``httpx2`` async transport, e.g. ``httpx2.ASGITransport(app)``).
    Use it as an async context manager, or await :meth:`aclose`."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        self._config = resolve(url, token, options)
        self._http = httpx2.AsyncClient(**self._config.http_options(), transport=transport)

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self._config.url

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _send(
        self, call: Call[T], *, stream: bool = False
    ) -> tuple[Exchange[T], httpx2.Response]:
        exchange = Exchange(call, self._config)
        while True:
            try:
                response = await self._http.send(exchange.request(self._http), stream=stream)
            except httpx2.HTTPError as exc:
                delay = exchange.failed(exc)
            else:
                if exchange.succeeded(response):
                    return exchange, response
                try:
                    with exchange.streaming():
                        await response.aread()  # the error's body (read already unless streamed)
                finally:
                    await response.aclose()
                delay = exchange.refused(response)
            await asyncio.sleep(delay)

    async def _execute(self, call: Call[T]) -> T:
        exchange, response = await self._send(call)
        return exchange.result(response)

    async def download(
        self,
        path: str,
        dest: Destination,
        *,
        workspace: str | None = None,
        progress: Progress | None = None,
    ) -> int:
        """As :meth:`noxsdk.NoxClient.download`."""
        call = routes.read_file(path, workspace=workspace)
        exchange, response = await self._send(call, stream=True)
        try:
            with exchange.streaming(), Sink(dest, content_length(response), progress) as sink:
                async for chunk in response.aiter_bytes(CHUNK_BYTES):
                    sink.write(chunk)
        finally:
            await response.aclose()
        return sink.done

    async def iter_file(
        self, path: str, *, workspace: str | None = None, chunk_size: int = CHUNK_BYTES
    ) -> AsyncIterator[bytes]:
        """As :meth:`noxsdk.NoxClient.iter_file`, with ``async for``."""
        call = routes.read_file(path, workspace=workspace)
        exchange, response = await self._send(call, stream=True)
        try:
            with exchange.streaming():
                async for chunk in response.aiter_bytes(chunk_size):
                    yield chunk
        finally:
            await response.aclose()

    async def stream_logs(self, *, duration_s: float | None = None) -> AsyncIterator[str]:
        """As :meth:`noxsdk.NoxClient.stream_logs`, with ``async for``."""
        exchange, response = await self._send(routes.log_stream(duration_s), stream=True)
        try:
            with exchange.streaming():
                async for event in httpx2.EventSource(response):
                    line = log_line(event)
                    if line is not None:
                        yield line
        finally:
            await response.aclose()
