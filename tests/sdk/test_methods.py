"""Every method of both clients against a real server, and every route of the server has one."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import pytest

from noxsdk import (
    AsyncNoxClient,
    AuthError,
    Execution,
    NotFoundError,
    NoxClient,
    TokenRole,
    _routes,
)
from noxsdk._endpoints import Endpoint, Endpoints

from .conftest import Server

pytestmark = pytest.mark.sandbox

Call = Callable[..., Awaitable[Any]]
STREAMING = {"download", "iter_file", "stream_logs"}  # the clients' own methods


def _endpoint_names() -> set[str]:
    return {name for name, value in vars(Endpoints).items() if isinstance(value, Endpoint)}


def _caller(client: NoxClient | AsyncNoxClient, called: set[str]) -> Call:
    """Calls a method by name on either client, awaiting when it is the async one."""

    async def call(name: str, *args: Any, **kwargs: Any) -> Any:
        called.add(name)
        result = getattr(client, name)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    return call


async def _tour(call: Call, server: Server, tag: str) -> None:
    folder = f"tour-{tag}"

    health = await call("health")
    assert health.status == "ok"
    assert health.version
    assert (await call("health_detailed")).status in ("ok", "degraded")
    me = await call("me")
    assert (me.role, me.workspace) == (TokenRole.ADMIN, "default")

    run = await call(
        "run_py",
        "import os, sys; print(sys.stdin.read().upper(), os.environ['TAG'])",
        stdin="abc",
        env={"TAG": tag},
        timeout_s=10,
    )
    assert isinstance(run, Execution)
    assert (run.status, run.stdout) == ("ok", f"ABC {tag}\n")
    failed = await call("run_sh", "echo $TAG; exit 3", env={"TAG": tag})
    assert (failed.status, failed.exit_code, failed.stdout) == ("error", 3, f"{tag}\n")

    written = await call("write_file", f"{folder}/a.txt", b"alpha\nbeta\n")
    assert (written.path, written.size, written.type) == (f"{folder}/a.txt", 11, "file")
    assert written.sha256 is not None
    put = await call("put", b"put-bytes", f"{folder}/sub/p.bin")
    assert (put.path, put.size) == (f"{folder}/sub/p.bin", 9)
    listing = await call("list_files", folder)
    assert {e.name for e in listing.entries} == {"a.txt", "sub"}
    tree = await call("list_files", folder, recursive=True)
    assert f"{folder}/sub/p.bin" in {e.path for e in tree.entries}
    assert await call("read_file", f"{folder}/a.txt") == b"alpha\nbeta\n"
    found = await call("search_files", "beta", glob=f"{folder}/*", max_results=5)
    assert [(m.path, m.line, m.text) for m in found.matches] == [(f"{folder}/a.txt", 2, "beta")]

    page = await call("history", limit=1, kind="shell")
    assert page.total >= 1
    assert [item.id for item in page.items] == [failed.id]
    detail = await call("execution", run.id)
    assert detail.code.startswith("import os")
    assert detail.stdout == run.stdout
    stats = await call("stats")
    assert stats.executions.total >= 2
    assert stats.sandbox.available
    assert (await call("resources")).cpu_count >= 1

    created = await call("create_token", f"tour-{tag}", "viewer", workspace=f"ws-{tag}")
    assert (created.role, created.workspace) == (TokenRole.VIEWER, f"ws-{tag}")
    listed = await call("list_tokens", workspace=f"ws-{tag}")
    assert [t.id for t in listed.items] == [created.id]
    with NoxClient(server.url, created.token) as viewer:
        assert viewer.me().name == f"tour-{tag}"
        assert await call("revoke_token", created.id) is None
        with pytest.raises(AuthError):
            viewer.me()

    entries = await call("audit", action="token.create", limit=5)
    assert any(e.target == created.id for e in entries.items)
    assert (await call("verify_audit")).ok
    policy = await call("policy")
    assert policy["rate_limits"]["roles"]["runner"] == "1/second"
    assert (await call("reload_policy"))["rate_limits"] == policy["rate_limits"]

    backup = await call("create_backup", f"tour-{tag}")
    assert backup.name == f"tour-{tag}"
    assert backup.size > 0
    assert backup.name in [b.name for b in (await call("list_backups")).items]
    restored = await call("restore_backup", backup.name)
    assert restored.restored.files >= 2
    assert restored.pre_restore

    cleaned = await call("clean", dry_run=True)
    assert cleaned.dry_run is True
    lines = (await call("logs", tail=5)).lines
    assert 1 <= len(lines) <= 5
    assert all("level" in json.loads(line) for line in lines)

    assert await call("delete_file", folder, recursive=True) is None
    with pytest.raises(NotFoundError):
        await call("list_files", folder)


def test_every_method_of_the_sync_client(server: Server) -> None:
    called: set[str] = set()
    with server.client() as client:
        asyncio.run(_tour(_caller(client, called), server, "sync"))
    assert called == _endpoint_names()


def test_every_method_of_the_async_client(server: Server) -> None:
    called: set[str] = set()

    async def main() -> None:
        async with server.aclient() as client:
            await _tour(_caller(client, called), server, "async")

    asyncio.run(main())
    assert called == _endpoint_names()


def test_every_route_of_the_server_has_a_method(server: Server) -> None:
    """The server's OpenAPI document against the SDK's route table (only /metrics, for
    Prometheus, has no method)."""
    schema = httpx2.get(f"{server.url}/openapi.json", timeout=10).json()
    served = {
        (method.upper(), re.sub(r"\{[^}]+\}", "{}", path))
        for path, operations in schema["paths"].items()
        for method in operations
        if path != "/metrics"
    }
    routes = {
        (row.method, re.sub(r"\{[^}]+\}", "{}", row.path))
        for row in vars(_routes).values()
        if isinstance(row, _routes.Route)
    }
    assert routes == served
    clients = [NoxClient, AsyncNoxClient]
    for name in _endpoint_names() | STREAMING:
        assert all(callable(getattr(cls, name)) for cls in clients), name
    assert inspect.iscoroutinefunction(AsyncNoxClient.download)
    assert inspect.isasyncgenfunction(AsyncNoxClient.iter_file)


def test_fifty_concurrent_runs_with_the_async_client(server: Server) -> None:
    async def main() -> list[Execution]:
        async with server.aclient() as client:
            return await asyncio.gather(
                *(client.run_py(f"print({i} * {i})", timeout_s=10) for i in range(50))
            )

    started = time.monotonic()
    runs = asyncio.run(asyncio.wait_for(main(), timeout=60))
    elapsed = time.monotonic() - started
    assert [(r.status, r.stdout) for r in runs] == [("ok", f"{i * i}\n") for i in range(50)]
    assert len({r.id for r in runs}) == 50
    assert elapsed < 30, f"50 concurrent runs took {elapsed:.1f} s"
