"""History over HTTP on the fake sandbox: paging, filters, one run in full, workspace isolation,
read-your-writes with the deferred history write, and retention (by count, by age, the thread)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from tests._history_rows import NOW, add_runs, ids_in
from tests.conftest import error_message as _error
from tests.conftest import hold_saves, nox_of

from nox_api.app import create_app
from nox_api.config import load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.services.auditing import Caller
from nox_api.services.history import MAX_OFFSET, MAX_PAGE_SIZE, HistoryService, parse_filter
from nox_api.services.retention import Retention
from nox_api.services.tokens import Role
from nox_api.storage.db import Database
from noxsdk.models import Execution, ExecutionDetail, ExecutionSummary, RunPython


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


# 45 runs: start times one second apart but for a block of five sharing one second (the id
# breaks the tie), ids not in start order, kinds and statuses mixed.
_STATUSES = ["ok", "ok", "error", "timeout", "killed"]
FORTY_FIVE = [
    {
        "id": f"run-{(i * 7) % 45:02d}",
        "started_at": NOW - timedelta(seconds=20 if 20 <= i < 25 else i),
        "kind": "shell" if i % 3 == 0 else "python",
        "status": _STATUSES[i % 5],
        "duration_ms": float(i),
    }
    for i in range(45)
]


def _newest_first(runs: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in sorted(runs, key=lambda r: (r["started_at"], r["id"]), reverse=True)]


@pytest.fixture
def with_45(client: TestClient) -> TestClient:
    add_runs(nox_of(client).db, *FORTY_FIVE)
    return client


def test_pages_cover_every_run_once_newest_first(with_45: TestClient) -> None:
    seen: list[str] = []
    for offset in range(0, 50, 10):
        resp = with_45.get("/api/history", params={"limit": 10, "offset": offset})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["total"] == 45
        assert len(body["items"]) == min(10, 45 - offset)
        seen += [item["id"] for item in body["items"]]
    assert seen == _newest_first(FORTY_FIVE)
    assert len(set(seen)) == 45
    times = [
        datetime.fromisoformat(i["started_at"])
        for i in with_45.get("/api/history", params={"limit": 45}).json()["items"]
    ]
    assert times == sorted(times, reverse=True)


def test_default_page_and_past_the_end(with_45: TestClient) -> None:
    body = with_45.get("/api/history").json()
    assert [i["id"] for i in body["items"]] == _newest_first(FORTY_FIVE)[:20]
    assert body["total"] == 45
    assert with_45.get("/api/history", params={"offset": 45}).json() == {"items": [], "total": 45}
    assert with_45.get("/api/history", params={"limit": MAX_PAGE_SIZE}).json()["total"] == 45


def test_items_carry_no_output_or_code(with_45: TestClient) -> None:
    item = with_45.get("/api/history", params={"limit": 1}).json()["items"][0]
    assert set(item) == set(Execution.model_fields) - {"stdout", "stderr"}
    assert "code" not in item
    assert set(ExecutionSummary.model_fields) == set(Execution.model_fields) - {"stdout", "stderr"}
    assert set(ExecutionDetail.model_fields) == set(Execution.model_fields) | {"code"}


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({"kind": "shell"}, lambda r: r["kind"] == "shell"),
        ({"kind": "python"}, lambda r: r["kind"] == "python"),
        ({"status": "error"}, lambda r: r["status"] == "error"),
        ({"status": "memory_limit"}, lambda r: False),
        ({"kind": "shell", "status": "ok"}, lambda r: r["kind"] == "shell" and r["status"] == "ok"),
        ({"kind": "", "status": ""}, lambda r: True),
    ],
)
def test_filters(
    with_45: TestClient, params: dict[str, str], keep: Callable[[dict[str, Any]], bool]
) -> None:
    expected = _newest_first([r for r in FORTY_FIVE if keep(r)])
    body = with_45.get("/api/history", params={**params, "limit": 500}).json()
    assert [i["id"] for i in body["items"]] == expected
    assert body["total"] == len(expected)
    page = with_45.get("/api/history", params={**params, "limit": 2, "offset": 1}).json()
    assert [i["id"] for i in page["items"]] == expected[1:3]
    assert page["total"] == len(expected)


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"kind": "ruby"}, 400, "unknown kind 'ruby'; use one of: python, shell"),
        ({"kind": "PYTHON"}, 400, "unknown kind"),
        ({"status": "crashed"}, 400, "unknown status 'crashed'; use one of: ok, error,"),
        ({"limit": 0}, 422, "limit"),
        ({"limit": MAX_PAGE_SIZE + 1}, 422, "limit"),
        ({"limit": "many"}, 422, "limit"),
        ({"offset": -1}, 422, "offset"),
        ({"offset": MAX_OFFSET + 1}, 422, "offset"),
    ],
)
def test_bad_filters_are_refused(
    client: TestClient, params: dict[str, Any], status: int, words: str
) -> None:
    message = _error(client.get("/api/history", params=params), status, "invalid_request")
    assert words in message


def test_detail_has_the_code_and_the_output(client: TestClient) -> None:
    ran = client.post("/run_sh", json={"cmd": "echo detail"}).json()
    resp = client.get(f"/api/history/{ran['id']}")
    assert resp.status_code == 200, resp.text
    detail = resp.json()
    assert detail == {**ran, "code": "echo detail"}
    assert detail["stdout"] == "detail\n"
    py = client.post("/run_py", json={"code": "print('p')\n"}).json()
    assert client.get(f"/api/history/{py['id']}").json()["code"] == "print('p')\n"
    message = _error(client.get("/api/history/nope"), 404, "not_found")
    assert message == "no run 'nope' in the history"


def test_a_run_shows_in_the_history_of_its_workspace_only(
    client: TestClient, make_token: Callable[..., str]
) -> None:
    runner_a = _auth(make_token(Role.RUNNER, "a"))
    viewer_a = _auth(make_token(Role.VIEWER, "a"))
    viewer_b = _auth(make_token(Role.VIEWER, "b"))
    ids = [
        client.post("/run_py", json={"code": f"print({n})"}, headers=runner_a).json()["id"]
        for n in range(2)
    ]
    mine = client.get("/api/history", headers=viewer_a).json()
    assert [i["id"] for i in mine["items"]] == ids[::-1]
    assert {i["workspace"] for i in mine["items"]} == {"a"}
    assert client.get(f"/api/history/{ids[0]}", headers=viewer_a).status_code == 200

    assert client.get("/api/history", headers=viewer_b).json() == {"items": [], "total": 0}
    hidden = _error(client.get(f"/api/history/{ids[0]}", headers=viewer_b), 404, "not_found")
    absent = _error(client.get("/api/history/0123456789abcdef", headers=viewer_b), 404, "not_found")
    assert hidden.replace(ids[0], "X") == absent.replace("0123456789abcdef", "X")
    for other in ("a", "default"):
        resp = client.get("/api/history", params={"workspace": other}, headers=viewer_b)
        assert _error(resp, 403, "forbidden") == "only an admin may act on another workspace"
    own = client.get("/api/history", params={"workspace": "b"}, headers=viewer_b)
    assert own.json() == {"items": [], "total": 0}

    # the admin token (workspace default): its own history by default, a's when it asks
    assert client.get("/api/history").json()["total"] == 0
    theirs = client.get("/api/history", params={"workspace": "a"}).json()
    assert [i["id"] for i in theirs["items"]] == ids[::-1]
    assert client.get(f"/api/history/{ids[1]}").json()["workspace"] == "a"


def test_a_read_waits_for_rows_still_being_written(client: TestClient, admin_token: str) -> None:
    """The run's row is written after its answer; a read that comes in between waits for it."""
    nox = nox_of(client)
    principal = nox.tokens.authenticate(admin_token)
    assert principal is not None
    held = hold_saves(nox)
    held["print(1)"] = threading.Event()
    execution = nox.executions.run(Caller(principal), RunPython(code="print(1)"))
    assert execution.id not in ids_in(nox.db)  # not written yet
    writer = threading.Timer(0.2, held["print(1)"].set)
    writer.start()
    try:
        started = time.monotonic()
        body = client.get("/api/history").json()
        assert time.monotonic() - started >= 0.15
    finally:
        writer.join()
    assert [i["id"] for i in body["items"]] == [execution.id]


def test_the_service_settles_before_it_reads(data_dir: Path) -> None:
    db = Database(f"sqlite:///{data_dir / 'h.db'}")
    db.migrate()
    calls: list[str] = []

    def settle() -> None:
        calls.append("settle")
        add_runs(db, {"id": f"late{len(calls)}", "workspace": "w"})

    history = HistoryService(db, settle)
    assert [i.id for i in history.page(parse_filter("w", None, None), 10, 0).items] == ["late1"]
    assert history.get("late2", "w").id == "late2"
    db.close()


# --- retention -------------------------------------------------------------------------------


@pytest.fixture
def db(data_dir: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{data_dir / 'r.db'}")
    database.migrate()
    yield database
    database.close()


def test_retention_keeps_the_newest_runs_of_each_workspace(db: Database) -> None:
    # a: 30 runs, the 10th and 11th newest share a start time (the id decides); b: 5 runs
    a = [
        {"id": f"a{i:02d}", "workspace": "a", "started_at": NOW - timedelta(minutes=i)}
        for i in range(30)
    ]
    a[10]["started_at"] = a[9]["started_at"]
    b = [{"id": f"b{i}", "workspace": "b", "started_at": NOW - timedelta(days=i)} for i in range(5)]
    add_runs(db, *a, *b)
    retention = Retention(db, keep_runs=10, keep_days=0, interval_s=60, batch_rows=7)
    deletes: list[str] = []
    event.listen(
        db.engine,
        "before_cursor_execute",
        lambda _c, _cur, sql, *_: deletes.append(sql) if sql.startswith("DELETE") else None,
    )
    report = retention.run_once()
    assert (report.by_count, report.by_age, report.removed) == (20, 0, 20)
    # a09 and a10 started together: a10 > a09, so a10 is the newer one and stays
    assert ids_in(db, "a") == {f"a{i:02d}" for i in range(9)} | {"a10"}
    assert ids_in(db, "b") == {f"b{i}" for i in range(5)}
    assert len(deletes) == 3  # batches of 7: 7 + 7 + 6
    assert retention.run_once().removed == 0


def test_retention_removes_runs_older_than_the_age(db: Database) -> None:
    ages = {"d40": 40 * 24 * 60, "d31": 31 * 24 * 60, "edge": 30 * 24 * 60, "d29": 29 * 24 * 60}
    add_runs(
        db,
        *({"id": k, "started_at": NOW - timedelta(minutes=m)} for k, m in ages.items()),
        {"id": "now", "started_at": NOW},
        {"id": "other-ws", "workspace": "x", "started_at": NOW - timedelta(days=100)},
    )
    retention = Retention(db, keep_runs=0, keep_days=30, interval_s=60, clock=lambda: NOW)
    report = retention.run_once()
    assert (report.by_age, report.by_count) == (3, 0)
    assert ids_in(db) == {"edge", "d29", "now"}  # exactly 30 days old is not older


def test_retention_rules_together_and_switched_off(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    add_runs(db, *({"id": f"r{d}", "started_at": NOW - timedelta(days=d)} for d in range(6)))
    off = Retention(db, keep_runs=0, keep_days=0, interval_s=60, clock=lambda: NOW)
    assert off.run_once().removed == 0
    assert len(ids_in(db)) == 6
    both = Retention(db, keep_runs=2, keep_days=3.5, interval_s=60, clock=lambda: NOW)
    with caplog.at_level(logging.INFO, logger="nox.retention"):
        report = both.run_once()
    assert (report.by_age, report.by_count) == (2, 2)
    assert ids_in(db) == {"r0", "r1"}
    assert (
        "history retention removed 4 run(s): 2 older than 3.5 days, 2 beyond the newest 2 of "
        "their workspace"
    ) in caplog.messages


def test_the_server_runs_retention_in_the_background_and_stops_it(
    data_dir: Path, admin_token: str
) -> None:
    settings = load_settings(
        data_dir=data_dir, pool_size=0, history_keep_runs=3, retention_interval_s=0.1
    )
    with TestClient(
        create_app(settings, sandbox=FakeSandbox()), headers=_auth(admin_token)
    ) as client:
        nox = nox_of(client)
        assert nox.retention.running
        add_runs(
            nox.db, *({"id": f"r{i}", "started_at": NOW - timedelta(hours=i)} for i in range(10))
        )
        deadline = time.monotonic() + 5
        while len(ids_in(nox.db)) > 3:
            assert time.monotonic() < deadline, "retention never ran"
            time.sleep(0.05)
        assert ids_in(nox.db) == {"r0", "r1", "r2"}
        assert client.get("/api/history").json()["total"] == 3
    assert not nox.retention.running


def test_history_queries_use_the_indexes(db: Database) -> None:
    """The migrated database answers the history and stats queries from indexes, not scans."""
    plans = {
        "SELECT id FROM executions WHERE workspace = 'a' ORDER BY started_at DESC, id DESC "
        "LIMIT 20": "ix_executions_workspace_started",
        "SELECT id FROM executions WHERE workspace = 'a' AND status = 'error' "
        "ORDER BY started_at DESC LIMIT 20": "ix_executions_workspace_status",
        "SELECT count(*) FROM executions WHERE workspace = 'a' AND kind = 'shell'": (
            "ix_executions_workspace_kind"
        ),
        "SELECT duration_ms FROM executions WHERE workspace = 'a' ORDER BY duration_ms "
        "LIMIT 1 OFFSET 9": "ix_executions_workspace_duration",
    }
    with db.connection() as conn:
        for sql, index in plans.items():
            plan = " ".join(
                str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
            )
            assert f"INDEX {index} " in plan, (sql, plan)
            assert "SCAN executions" not in plan, (sql, plan)
