""":class:`NoxClient`, the blocking client of the Nox HTTP API.

Its methods are those of :class:`~noxsdk._endpoints.Endpoints` (shared with
:class:`~noxsdk.AsyncNoxClient`) plus the streaming ones below; what they send, how answers and
failures are read and when a call is retried live in ``noxsdk._core``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
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

__all__ = ["NoxClient"]

T = TypeVar("T")


class NoxClient(Endpoints):
    """A connection to a Nox server.

    ``url`` defaults to ``NOX_URL``, then ``http://127.0.0.1:8080``; ``token`` to
    ``NOX_API_TOKEN``. ``options`` (all keyword): ``timeout`` (seconds to wait for data, 60),
    ``connect_timeout`` (5), ``max_retries`` (3), ``backoff_s`` (0.5), ``backoff_max_s`` (30),
    ``on_retry`` (a hook called before each retry), ``headers``, ``verify`` (TLS).
    ``transport`` replaces the network (an ``httpx2`` transport, e.g. for tests).
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        transport: httpx2.BaseTransport | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        self._config = resolve(url, token, options)
        self._http = httpx2.Client(**self._config.http_options(), transport=transport)

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self._config.url

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _send(self, call: Call[T], *, stream: bool = False) -> tuple[Exchange[T], httpx2.Response]:
        exchange = Exchange(call, self._config)
        while True:
            try:
                response = self._http.send(exchange.request(self._http), stream=stream)
            except httpx2.HTTPError as exc:
                delay = exchange.failed(exc)
            else:
                if exchange.succeeded(response):
                    return exchange, response
                try:
                    with exchange.streaming():
                        response.read()  # the error's body (read already unless streamed)
                finally:
                    response.close()
                delay = exchange.refused(response)
            time.sleep(delay)

    def _execute(self, call: Call[T]) -> T:
        exchange, response = self._send(call)
        return exchange.result(response)

    def download(
        self,
        path: str,
        dest: Destination,
        *,
        workspace: str | None = None,
        progress: Progress | None = None,
    ) -> int:
        """``GET /api/files/{path}`` streamed to ``dest`` (a ``pathlib.Path``, written whole or
        not at all, or a binary file object); returns the bytes written. ``progress`` is called
        with (bytes done, bytes in all)."""
        exchange, response = self._send(routes.read_file(path, workspace=workspace), stream=True)
        try:
            with exchange.streaming(), Sink(dest, content_length(response), progress) as sink:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    sink.write(chunk)
        finally:
            response.close()
        return sink.done

    def iter_file(
        self, path: str, *, workspace: str | None = None, chunk_size: int = CHUNK_BYTES
    ) -> Iterator[bytes]:
        """``GET /api/files/{path}`` as chunks of at most ``chunk_size`` bytes; the request is
        sent at the first ``next()``. Read it to the end or close it."""
        exchange, response = self._send(routes.read_file(path, workspace=workspace), stream=True)
        try:
            with exchange.streaming():
                yield from response.iter_bytes(chunk_size)
        finally:
            response.close()

    def stream_logs(self, *, duration_s: float | None = None) -> Iterator[str]:
        """``GET /api/logs/stream`` (admin): each server log line (one JSON object) as it is
        written, until ``duration_s`` passed (None: until closed). Lines the server dropped
        because this client read too slowly are logged as a warning on the ``noxsdk`` logger."""
        exchange, response = self._send(routes.log_stream(duration_s), stream=True)
        try:
            with exchange.streaming():
                for event in httpx2.EventSource(response):
                    line = log_line(event)
                    if line is not None:
                        yield line
        finally:
            response.close()
