"""A real HTTP server on 127.0.0.1 that answers from a script: what a client meets when its URL
points at something that is not Nox, or at a proxy that fails (HTML errors, 503 with
Retry-After, dropped connections, slow answers)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # wait before answering
    drop: bool = False  # close the connection without answering
    length: int | None = None  # the Content-Length sent, when it must not be the body's

    @classmethod
    def json(cls, status: int, value: Any, **headers: str) -> Answer:
        headers = {"Content-Type": "application/json", **headers}
        return cls(status, json.dumps(value).encode(), headers)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body_bytes: int


class ScriptedServer:
    """Answers requests with the queued :class:`Answer` objects in turn (the last one
    repeats); ``seen`` lists the requests."""

    def __init__(self) -> None:
        self.answers: deque[Answer] = deque()
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.url = ""

    def script(self, *answers: Answer) -> None:
        with self.lock:
            self.answers.clear()
            self.answers.extend(answers)
            self.seen.clear()

    def next_answer(self) -> Answer:
        with self.lock:
            return self.answers.popleft() if len(self.answers) > 1 else self.answers[0]


def _handler(scripted: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _body_bytes(self) -> int:
            length = self.headers.get("Content-Length")
            if length is not None:
                return len(self.rfile.read(int(length)))
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return 0
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                self.rfile.read(size + 2)  # the chunk and its CRLF
                total += size
                if size == 0:
                    return total

        def _serve(self) -> None:
            answer = scripted.next_answer()
            if answer.drop:
                with scripted.lock:
                    scripted.seen.append(Seen(self.command, self.path, dict(self.headers), 0))
                self.close_connection = True
                return
            received = self._body_bytes()
            with scripted.lock:
                scripted.seen.append(Seen(self.command, self.path, dict(self.headers), received))
            time.sleep(answer.delay_s)
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(answer.length or len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
            if answer.length is not None:  # a body cut short: the connection ends with it
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815 - stdlib's names

    return Handler


@contextmanager
def scripted_server() -> Iterator[ScriptedServer]:
    """A :class:`ScriptedServer` on a free port of 127.0.0.1 for the block."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up
                super().handle_error(request, client_address)

    scripted = ScriptedServer()
    server = Server(("127.0.0.1", 0), _handler(scripted))
    scripted.url = f"http://127.0.0.1:{server.server_address[1]}"
    scripted.script(Answer.json(200, {"status": "ok", "version": "scripted"}))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield scripted
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
