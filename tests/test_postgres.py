"""Nox on a real PostgreSQL server (``NOX_DATABASE_URL=postgresql+psycopg://...``).

The module starts a throw-away PostgreSQL server itself: ``initdb`` into a folder under /tmp (as
an unprivileged user when the tests run as root: postgres refuses root), listening on 127.0.0.1
only, on a free port, its unix sockets in that folder; stopped and removed at the end. Each test
gets a database of its own. The server's time zone is not UTC on purpose: a datetime that loses
its zone on the way in or out shows.

No PostgreSQL binaries is a failure, not a skip: the machines this suite runs on have them
(Debian: ``apt-get install postgresql``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from psycopg import sql
from pydantic import SecretStr
from sqlalchemy import func, inspect, select, update
from sqlalchemy.dialects.postgresql import TIMESTAMP
from tests.conftest import free_port, nox_of, write_policy
from typer.testing import CliRunner

from nox_api.app import create_app
from nox_api.cli import app as cli_app
from nox_api.config import Settings, load_settings
from nox_api.engine.base import Result, RunSpec
from nox_api.engine.fake import FakeSandbox
from nox_api.services.audit import Checkpoint
from nox_api.services.auditing import DatabaseCheckpointStore
from nox_api.services.quotas import QuotaService, utc_day
from nox_api.services.retention import Retention
from nox_api.services.stats import PERCENTILE, nearest_rank
from nox_api.services.tokens import Role, TokenService
from nox_api.storage.db import Database, alembic_config
from nox_api.storage.models import AuditCheckpointRow, Base, ExecutionRow, TokenRow, UsageRow
from noxsdk.models import ExecutionStatus

PG_ROOT = Path("/usr/lib/postgresql")
PG_TOOLS = ("initdb", "pg_ctl", "postgres")
INSTALL_HINT = (
    "install the PostgreSQL server (Debian/Ubuntu: apt-get install postgresql; it puts "
    "initdb, pg_ctl and postgres in /usr/lib/postgresql/<major>/bin)"
)
UNPRIVILEGED = 65534  # nobody: postgres refuses to run as root
SETUP_BUDGET_S = 30.0  # the whole server start, initdb included (about 1.5 s here)
STOP_TIMEOUT_S = 15.0
SERVER_ZONE = "Pacific/Chatham"  # +12:45 or +13:45: never mistaken for UTC

_names = itertools.count(1)


# --- the server ---------------------------------------------------------------------------------


def pg_bindir() -> Path:
    """The folder of the newest PostgreSQL server binaries: /usr/lib/postgresql/<major>/bin
    (Debian), else the folder of ``pg_ctl`` on PATH. Fails (never skips) when there is none."""

    def complete(folder: Path) -> bool:
        return all(os.access(folder / tool, os.X_OK) for tool in PG_TOOLS)

    found = [
        (int(folder.parent.name), folder)
        for folder in PG_ROOT.glob("*/bin")
        if folder.parent.name.isdigit() and complete(folder)
    ]
    if found:
        return max(found)[1]
    on_path = shutil.which("pg_ctl")
    if on_path is not None and complete(Path(on_path).parent):
        return Path(on_path).parent
    pytest.fail(
        f"no PostgreSQL server binaries ({', '.join(PG_TOOLS)}) under {PG_ROOT}/*/bin or on "
        f"PATH: {INSTALL_HINT}",
        pytrace=False,
    )


@dataclass(frozen=True, slots=True)
class PgServer:
    port: int
    folder: Path

    def admin(self) -> psycopg.Connection[Any]:
        """A connection to the maintenance database, in autocommit (CREATE DATABASE)."""
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        )

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self, most: float) -> float:
        """At most ``most`` seconds, and never past the deadline."""
        left = self._end - time.monotonic()
        if left <= 0:
            pytest.fail(f"starting PostgreSQL took more than {SETUP_BUDGET_S:.0f} s", pytrace=False)
        return min(most, left)


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server of this module only, on 127.0.0.1, stopped and removed at the end."""
    bindir = pg_bindir()
    deadline = _Deadline(SETUP_BUDGET_S)
    folder = Path(tempfile.mkdtemp(prefix="nox-pg-", dir="/tmp"))
    data, log = folder / "data", folder / "server.log"
    as_user: list[str] = []
    if os.geteuid() == 0:
        os.chown(folder, UNPRIVILEGED, UNPRIVILEGED)
        as_user = [
            "setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups",
        ]  # fmt: skip
    # The developer's PG* variables (PGDATA, PGPORT, PGHOST...) must not steer this server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}

    def run(args: list[str], most_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*as_user, *args],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=deadline.left(most_s),
            check=False,
        )

    started = False
    try:
        done = run(
            [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            20,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"initdb failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
        started = True  # from here on a stop is due, even after a failed or timed-out start
        for _attempt in range(3):  # the free port may be taken before the server binds it
            port = free_port()
            options = (
                f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off -c TimeZone={SERVER_ZONE}"
            )
            done = run(
                [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "30",
                 "start", "-o", options],
                35,
            )  # fmt: skip
            if done.returncode == 0:
                break
        else:
            pytest.fail(
                f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{_tail(log)}", pytrace=False
            )
        server = PgServer(port=port, folder=folder)
        with server.admin() as conn:
            version = conn.execute("SHOW server_version_num").fetchone()
            assert version is not None
        yield server
    finally:
        if started:
            _stop(as_user, bindir, data, env)
        shutil.rmtree(folder, ignore_errors=True)


def _stop(as_user: list[str], bindir: Path, data: Path, env: dict[str, str]) -> None:
    """``pg_ctl stop -m fast``; when that fails, SIGKILL the postmaster this module started
    (the pid of its ``postmaster.pid``, when that process is a postgres of this data folder)."""
    pid_file = data / "postmaster.pid"
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "10", "stop",
             "-m", "fast"],
            cwd=data.parent, env=env, stdin=subprocess.DEVNULL, capture_output=True,
            timeout=STOP_TIMEOUT_S, check=False,
        )  # fmt: skip
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pid_file.read_text().splitlines()[0])  # still there: the server may still run
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"postgres" in cmdline and str(data).encode() in cmdline:
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A new, empty database of this test alone."""
    name = f"nox_test_{next(_names)}_{os.getpid()}"
    with pg_server.admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.url(name)
    with pg_server.admin() as conn, contextlib.suppress(psycopg.Error):
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def settings(data_dir: Path, pg_url: str) -> Settings:
    """Overrides conftest's ``settings``: ``client``, ``admin_token`` and ``make_token`` of this
    module all work on PostgreSQL."""
    return load_settings(data_dir=data_dir, database_url=pg_url, pool_size=0)


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    db.migrate()
    yield db
    db.close()


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _utc(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert value.utcoffset() == timedelta(0), f"{text} is not UTC"
    return value


def _row(run_id: str, workspace: str, started: datetime, **fields: Any) -> ExecutionRow:
    values: dict[str, Any] = {
        "kind": "python", "status": "ok", "exit_code": 0, "stdout": "", "stderr": "",
        "stdout_truncated": False, "stderr_truncated": False, "duration_ms": 1.0,
        "actor": "pg-test", "code": "pass",
    } | fields  # fmt: skip
    return ExecutionRow(id=run_id, workspace=workspace, started_at=started, **values)


# --- schema -------------------------------------------------------------------------------------


def test_server_start_migrates_a_fresh_database_to_head(
    settings: Settings, fake: FakeSandbox
) -> None:
    with TestClient(create_app(settings, sandbox=fake)) as c:
        db = nox_of(c).db
        assert db.engine.dialect.name == "postgresql"
        assert db.revision() == db.head()
        assert db.head() is not None
        tables = set(inspect(db.engine).get_table_names())
        assert set(Base.metadata.tables) | {"alembic_version"} == tables
        # every datetime column keeps its zone on PostgreSQL (timestamp WITH time zone)
        for table in Base.metadata.sorted_tables:
            for column in inspect(db.engine).get_columns(table.name):
                if isinstance(column["type"], TIMESTAMP):
                    assert column["type"].timezone, f"{table.name}.{column['name']}"
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree on PostgreSQL: {diff}"
        assert c.get("/health").status_code == 200
    db = Database(settings.sqlalchemy_url)  # a restart migrates again: nothing to do
    try:
        db.migrate()
        assert db.revision() == db.head()
    finally:
        db.close()


def test_every_revision_upgrades_in_place_on_postgresql(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        cfg = alembic_config(db.engine)
        revisions = list(reversed(list(ScriptDirectory.from_config(cfg).walk_revisions())))
        command.upgrade(cfg, revisions[0].revision)
        with db.session() as s:
            s.add(
                TokenRow(id="t1", name="old", role="admin", workspace="default",
                         token_hash="0" * 64, created_at=datetime.now(UTC))
            )  # fmt: skip
        for rev in revisions[1:]:
            command.upgrade(cfg, rev.revision)
            assert db.revision() == rev.revision
        assert db.revision() == db.head()
        with db.session() as s:
            assert s.scalar(select(TokenRow.name).where(TokenRow.id == "t1")) == "old"
    finally:
        db.close()


def test_servers_starting_together_all_migrate(pg_url: str) -> None:
    """Servers started at once on an empty database: one creates the schema, the others wait
    for it and find it done; none fails on a table another has just created. Separate processes,
    as real servers are (Alembic's context is one per process)."""
    script = (
        "import sys\n"
        "from nox_api.storage.db import Database\n"
        "db = Database(sys.argv[1])\n"
        "db.engine.connect().close()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "db.migrate()\n"
        "print(db.revision(), flush=True)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, pg_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outcomes = []
    try:
        for proc in procs:  # all imported and connected: then go, all at once
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            out, err = proc.communicate(timeout=30)
            outcomes.append((proc.returncode, out.strip(), err[-1500:]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    db = Database(pg_url)
    try:
        head = db.head()
        assert outcomes == [(0, head, "")] * len(procs)
        assert db.revision() == head
    finally:
        db.close()


# --- tokens -------------------------------------------------------------------------------------


def test_tokens_offline_and_over_the_api(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # offline: the service, as `nox-api token create` uses it, and the command itself
    db = Database(settings.sqlalchemy_url)
    try:
        issued = TokenService(db).create("offline", Role.RUNNER, "team-a", expires_in_days=1)
        principal = TokenService(db).authenticate(issued.secret)
        assert principal == issued.principal
        info = TokenService(db).get(issued.principal.id)
        assert info is not None
        assert info.created_at == issued.created_at  # microseconds and zone survive
        assert info.created_at.utcoffset() == timedelta(0)
        assert info.expires_at == issued.expires_at
        assert info.active
    finally:
        db.close()
    monkeypatch.setenv("NOX_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("NOX_DATABASE_URL", settings.sqlalchemy_url)
    made = CliRunner().invoke(cli_app, ["token", "create", "--name", "cli-bot"])
    assert made.exit_code == 0, made.output
    cli_secret = made.output.strip()

    me = client.get("/api/me", headers=_auth(issued.secret))
    assert me.status_code == 200, me.text
    assert me.json()["workspace"] == "team-a"
    assert client.get("/api/me", headers=_auth(cli_secret)).json()["name"] == "cli-bot"

    created = client.post(
        "/api/tokens",
        json={"name": "api-bot", "role": "viewer", "workspace": "team-b", "expires_in_days": 7},
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert _utc(body["expires_at"]) - _utc(body["created_at"]) == timedelta(days=7)
    secret = body["token"]
    assert client.get("/api/me", headers=_auth(secret)).json()["role"] == "viewer"

    listed = {t["id"]: t for t in client.get("/api/tokens").json()["items"]}
    assert {issued.principal.id, body["id"]} <= set(listed)
    assert _utc(listed[body["id"]]["created_at"]) == _utc(body["created_at"])

    assert client.delete(f"/api/tokens/{body['id']}").status_code == 204
    assert client.get("/api/me", headers=_auth(secret)).status_code == 401  # at once
    revoked = {t["id"]: t for t in client.get("/api/tokens").json()["items"]}[body["id"]]
    assert revoked["revoked_at"] is not None
    assert _utc(revoked["revoked_at"]) >= _utc(body["created_at"])

    # an expired token is refused (the comparison of aware datetimes on PostgreSQL's values)
    with nox_of(client).db.session() as s:
        s.execute(
            update(TokenRow)
            .where(TokenRow.id == issued.principal.id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert client.get("/api/me", headers=_auth(issued.secret)).status_code == 401
    assert client.get("/api/me", headers=_auth(cli_secret)).status_code == 200


# --- runs and history ---------------------------------------------------------------------------


def test_runs_are_saved_and_the_history_filters_work(
    client: TestClient, make_token: Callable[..., str]
) -> None:
    runner = _auth(make_token(Role.RUNNER, "team-a"))
    answers = [
        client.post("/run_py", json={"code": "print('one')"}, headers=runner).json(),
        client.post("/run_sh", json={"cmd": "exit 3"}, headers=runner).json(),
        client.post("/run_sh", json={"cmd": "echo two"}, headers=runner).json(),
        client.post("/run_py", json={"code": "print(3)", "timeout_s": 2}, headers=runner).json(),
    ]
    assert [a["status"] for a in answers] == ["ok", "error", "ok", "ok"]
    other = client.post("/run_py", json={"code": "print('admin')"}).json()  # workspace default

    page = client.get("/api/history", headers=runner)
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["total"] == 4
    assert [i["id"] for i in body["items"]] == [a["id"] for a in reversed(answers)]
    for item, answer in zip(body["items"], reversed(answers), strict=True):
        assert _utc(item["started_at"]) == _utc(answer["started_at"])
        assert item["limits"] == answer["limits"]  # the JSON column, back as it went in
        assert item["workspace"] == "team-a"
    assert body["items"][0]["limits"]["timeout_s"] == 2

    def ids(**params: Any) -> list[str]:
        got = client.get("/api/history", params=params, headers=runner)
        assert got.status_code == 200, got.text
        return [i["id"] for i in got.json()["items"]]

    py, sh_err, sh_ok, py2 = (a["id"] for a in answers)
    assert ids(kind="shell") == [sh_ok, sh_err]
    assert ids(kind="python") == [py2, py]
    assert ids(status="error") == [sh_err]
    assert ids(kind="shell", status="ok") == [sh_ok]
    assert ids(kind="", status="") == [py2, sh_ok, sh_err, py]
    assert ids(status="timeout") == []
    assert ids(limit=2) == [py2, sh_ok]
    assert ids(limit=2, offset=2) == [sh_err, py]
    assert ids(offset=10) == []
    filtered = client.get("/api/history", params={"kind": "shell", "limit": 1}, headers=runner)
    assert filtered.json()["total"] == 2
    assert client.get("/api/history", params={"status": "nope"}).status_code == 400

    # an admin pages through another workspace; its own shows its own run
    assert [i["id"] for i in client.get("/api/history").json()["items"]] == [other["id"]]
    as_admin = client.get("/api/history", params={"workspace": "team-a", "kind": "python"})
    assert [i["id"] for i in as_admin.json()["items"]] == [py2, py]

    one = client.get(f"/api/history/{py}", headers=runner)
    assert one.status_code == 200, one.text
    detail = one.json()
    assert (detail["stdout"], detail["code"], detail["kind"]) == ("one\n", "print('one')", "python")
    assert _utc(detail["started_at"]) == _utc(answers[0]["started_at"])
    assert client.get(f"/api/history/{sh_err}", headers=runner).json()["exit_code"] == 3
    assert client.get(f"/api/history/{other['id']}", headers=runner).status_code == 404
    assert client.get(f"/api/history/{'x' * 200}", headers=runner).status_code == 404
    assert client.get(f"/api/history/{other['id']}").status_code == 200  # admin: any


def test_output_that_postgresql_text_cannot_hold_is_still_saved(
    client: TestClient, fake: FakeSandbox
) -> None:
    """A NUL byte in a run's output: PostgreSQL ``text`` refuses NUL characters, SQLite keeps
    them. The run must still reach the history (and count against the quota)."""

    def binary(spec: RunSpec) -> Result:
        return Result(
            status=ExecutionStatus.OK, exit_code=0, stdout=b"a\x00b\xffc", stderr=b"\x00",
            stdout_truncated=False, stderr_truncated=False, duration_ms=1.0, cpu_ms=1.0,
        )  # fmt: skip

    fake.handler = binary
    answer = client.post("/run_py", json={"code": "print('binary')"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["stdout"] == "a\x00b\ufffdc"  # the answer is the output as decoded
    detail = client.get(f"/api/history/{answer.json()['id']}")
    assert detail.status_code == 200, detail.text
    assert detail.json()["stdout"] == "a\ufffdb\ufffdc"  # NUL stored as U+FFFD
    assert detail.json()["stderr"] == "\ufffd"
    assert nox_of(client).quotas.usage("default").runs == 1


def test_ids_with_a_nul_character_are_not_found(client: TestClient) -> None:
    """PostgreSQL refuses NUL even in a query's parameter: an id with one is simply unknown."""
    for method, url in (
        ("GET", "/api/history/a%00b"),
        ("DELETE", "/api/tokens/a%00b"),
    ):
        got = client.request(method, url)
        assert got.status_code == 404, (method, url, got.text)


# --- quotas -------------------------------------------------------------------------------------

THREE_RUNS_A_DAY = """
quotas:
  default:
    runs_per_day: 3
    upload_mib_per_day: 1
"""


def test_two_servers_count_into_the_same_day_row(
    data_dir: Path, pg_url: str, fake: FakeSandbox, make_token: Callable[..., str]
) -> None:
    settings = load_settings(
        data_dir=data_dir, database_url=pg_url, pool_size=0,
        policy_file=write_policy(data_dir, THREE_RUNS_A_DAY),
    )  # fmt: skip
    runner = _auth(make_token(Role.RUNNER))
    with (
        TestClient(create_app(settings, sandbox=fake), headers=runner) as a,
        TestClient(create_app(settings, sandbox=FakeSandbox()), headers=runner) as b,
    ):
        assert nox_of(a).db is not nox_of(b).db  # two engines: two servers
        assert a.post("/run_py", json={"code": "print(1)"}).status_code == 200
        assert b.post("/run_py", json={"code": "print(2)"}).status_code == 200
        assert a.post("/put", files={"file": ("x.bin", b"x" * 1000)}).status_code == 201
        assert b.post("/put", files={"file": ("y.bin", b"y" * 24)}).status_code == 201
        for server in (a, b):
            nox_of(server).executions.settle()
        with nox_of(a).db.connection() as conn:
            rows = conn.execute(select(UsageRow)).all()
        assert [(r.workspace, r.day, r.runs, r.upload_bytes) for r in rows] == [
            ("default", utc_day(), 2, 1024)
        ]
        assert rows[0].cpu_ms == pytest.approx(0.2)
        # a's own cache has not seen b's run yet; once read again it has
        nox_of(a).quotas.forget_cached()
        assert a.post("/run_sh", json={"cmd": "echo 3"}).status_code == 200
        nox_of(b).quotas.forget_cached()
        refused = b.post("/run_sh", json={"cmd": "echo 4"})
        assert refused.status_code == 429, refused.text
        assert "has used 3 of its 3 runs today" in refused.json()["error"]["message"]
        nox_of(a).executions.settle()
        assert nox_of(b).quotas.usage("default").runs == 3


def test_concurrent_upserts_from_two_engines_lose_nothing(pg_db: Database, pg_url: str) -> None:
    """The first write of a day races on the INSERT, the others on the UPDATE: ON CONFLICT
    DO UPDATE on PostgreSQL must neither fail nor lose an addition."""
    other = Database(pg_url)
    engines = [(QuotaService(db, policy=None), db) for db in (pg_db, other)]  # type: ignore[arg-type]
    per_thread, threads_per_engine = 20, 4
    barrier = threading.Barrier(len(engines) * threads_per_engine)
    errors: list[BaseException] = []

    def add(service: QuotaService, db: Database) -> None:
        try:
            barrier.wait(10)
            for _ in range(per_thread):
                service.record_upload("race", 3)
                with db.session() as session:
                    service.record_run(session, "race", 0.5)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=add, args=engine)
        for engine in engines
        for _ in range(threads_per_engine)
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(30)
    finally:
        other.close()
    assert errors == []
    total = per_thread * threads_per_engine * len(engines)
    used = engines[0][0].usage("race")
    assert (used.runs, used.upload_bytes) == (total, 3 * total)
    assert used.cpu_ms == pytest.approx(0.5 * total)


# --- audit checkpoint ---------------------------------------------------------------------------


def test_audit_checkpoint_is_written_and_read_back(pg_db: Database) -> None:
    store = DatabaseCheckpointStore(pg_db, background=False)
    assert store.load() is None
    store.save(Checkpoint(5, "a" * 64))
    assert store.load() == Checkpoint(5, "a" * 64)
    store.save(Checkpoint(3, "b" * 64))  # never backwards
    assert DatabaseCheckpointStore(pg_db).load() == Checkpoint(5, "a" * 64)
    store.save(Checkpoint(6, "c" * 64))
    assert DatabaseCheckpointStore(pg_db).load() == Checkpoint(6, "c" * 64)
    with pg_db.session() as s:
        row = s.get(AuditCheckpointRow, 1)
        assert row is not None
        assert row.updated_at.utcoffset() == timedelta(0)
        assert datetime.now(UTC) - row.updated_at < timedelta(minutes=1)


def test_the_servers_audit_checkpoint_follows_its_log(client: TestClient) -> None:
    for name in ("one", "two"):
        assert client.post("/api/tokens", json={"name": name, "role": "viewer"}).status_code == 201
    nox = nox_of(client)
    nox.auditor.flush_checkpoint()
    lines = sum(
        len(p.read_bytes().splitlines()) for p in nox.settings.audit_dir.glob("audit*.jsonl")
    )
    assert lines >= 2
    with nox.db.connection() as conn:
        count, mac = conn.execute(
            select(AuditCheckpointRow.count, AuditCheckpointRow.last_mac)
        ).one()
    assert count == lines
    assert len(mac) == 64
    verified = client.get("/api/audit/verify").json()
    assert verified["ok"], verified


# --- stats, retention, health -------------------------------------------------------------------


def test_stats_answer_from_postgresql(client: TestClient, fake: FakeSandbox) -> None:
    durations = [float(d) for d in (5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11, 12, 13, 14, 15, 16, 17,
                                    18, 19, 20, 21)]  # fmt: skip

    def timed(spec: RunSpec) -> Result:
        code = int(spec.source.split("#")[1])
        return Result(
            status=ExecutionStatus.ERROR if code % 5 == 0 else ExecutionStatus.OK,
            exit_code=1 if code % 5 == 0 else 0, stdout=b"", stderr=b"",
            stdout_truncated=False, stderr_truncated=False,
            duration_ms=durations[code], cpu_ms=1.0,
        )  # fmt: skip

    fake.handler = timed
    for i in range(len(durations)):
        kind = ("/run_sh", "cmd") if i % 3 == 0 else ("/run_py", "code")
        assert client.post(kind[0], json={kind[1]: f"true #{i}"}).status_code == 200
    nox = nox_of(client)
    with nox.db.session() as s:  # a run of two days ago: in the totals, not in the last 24 h
        s.add(_row("old1", "default", datetime.now(UTC) - timedelta(days=2), duration_ms=100.0))
    (nox.workspaces.path("default") / "f.txt").write_bytes(b"12345")
    nox.stats.scanner.scan("default")

    stats = client.get("/api/system/stats", params={"workspace": "default"})
    assert stats.status_code == 200, stats.text
    ex = stats.json()["executions"]
    everything = [*durations, 100.0]
    assert ex["total"] == len(everything)
    assert ex["last_24h"] == len(durations)
    errors = sum(1 for i in range(len(durations)) if i % 5 == 0)
    assert ex["by_status"]["error"] == errors
    assert ex["by_status"]["ok"] == len(everything) - errors
    shells = sum(1 for i in range(len(durations)) if i % 3 == 0)
    assert ex["by_kind"] == {"python": len(everything) - shells, "shell": shells}
    assert ex["mean_duration_ms"] == pytest.approx(sum(everything) / len(everything), abs=1e-3)
    rank = nearest_rank(len(everything), PERCENTILE)
    assert ex["p95_duration_ms"] == sorted(everything)[rank - 1]
    files = stats.json()["files"]
    assert (files["count"], files["bytes"], files["workspaces"]) == (1, 5, 1)
    assert _utc(files["scanned_at"]) <= datetime.now(UTC)

    everyone = client.get("/api/system/stats").json()
    assert everyone["executions"]["total"] == len(everything)
    empty = client.get("/api/system/stats", params={"workspace": "nobody-here"}).json()
    assert empty["executions"]["total"] == 0
    assert empty["executions"]["p95_duration_ms"] is None
    assert empty["files"]["workspaces"] == 0


def test_retention_deletes_old_rows_on_postgresql(pg_db: Database) -> None:
    now = datetime.now(UTC)
    with pg_db.session() as s:
        for i in range(3):  # older than 30 days
            s.add(_row(f"old{i}", "a", now - timedelta(days=40, minutes=i)))
        for i, minutes in enumerate((10, 8, 8, 7, 6)):  # recent; b1 and b2 share a time
            s.add(_row(f"b{i}", "b", now - timedelta(minutes=minutes)))
        s.add(_row("a-new", "a", now - timedelta(minutes=1)))
    retention = Retention(
        pg_db, keep_runs=3, keep_days=30, interval_s=600, batch_rows=2, pause_s=0,
        clock=lambda: now,
    )  # fmt: skip
    report = retention.run_once()
    assert (report.by_age, report.by_count) == (3, 2)
    with pg_db.connection() as conn:
        left = set(conn.execute(select(ExecutionRow.id)).scalars())
    # the newest 3 of b: b4, b3, then b2 before b1 (the same time: the higher id is newer)
    assert left == {"a-new", "b2", "b3", "b4"}
    assert retention.run_once().removed == 0
    with pg_db.connection() as conn:
        assert conn.execute(select(func.count()).select_from(ExecutionRow)).scalar_one() == 4


def test_detailed_health_reports_the_database_ok(client: TestClient) -> None:
    got = client.get("/api/health/detailed")
    assert got.status_code == 200, got.text
    database = got.json()["checks"]["database"]
    assert database["status"] == "ok", database
    head = nox_of(client).db.head()
    assert (database["revision"], database["head"]) == (head, head)
    assert database["latency_ms"] >= 0


def test_backups_refuse_a_postgresql_database_with_a_reason(client: TestClient) -> None:
    """On purpose (docs/backups.md): PostgreSQL is backed up with its own tools."""
    nox_of(client).settings.backup_key = SecretStr("ab" * 32)
    refused = client.post("/api/backups", json={"name": "on-postgres"})
    assert refused.status_code == 400, refused.text
    assert "only a SQLite database" in refused.json()["error"]["message"]
    assert "postgresql" in refused.json()["error"]["message"]
