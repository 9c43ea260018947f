"""A Nox app served by uvicorn on 127.0.0.1 inside the benchmark's own process (fake sandbox),
for the benchmarks that measure the HTTP layer rather than sandboxes."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.services.tokens import Role, TokenService
from nox_api.storage.db import Database

__all__ = ["Served", "serving"]


@dataclass(frozen=True)
class Served:
    url: str
    token: str
    app: FastAPI
    settings: Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(
    role: Role, prepare: Callable[[Settings], None] | None = None, prefix: str = "nox-bench-"
) -> Iterator[Served]:
    """A fresh data folder, a token of ``role`` whose rate limit never refuses the benchmark
    (still counted on every request), ``prepare(settings)`` before the app starts, then the app
    on a free port until the block ends."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(f"rate_limits:\n  roles:\n    {role.value}: 1000000/minute\n")
        settings = load_settings(data_dir=Path(tmp) / "data", pool_size=0, policy_file=policy)
        settings.data_path.mkdir(parents=True)
        db = Database(settings.sqlalchemy_url)
        db.migrate()
        token = TokenService(db).create("bench", role).secret
        db.close()
        if prepare is not None:
            prepare(settings)
        app = create_app(settings, sandbox=FakeSandbox())
        port = _free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", access_log=False
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not server.started:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("the in-process server did not start")
                time.sleep(0.02)
            yield Served(f"http://127.0.0.1:{port}", token, app, settings)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
