"""System statistics and resources over HTTP on the fake sandbox, the storage scanner behind the
file counts, and the cgroup limit reader on sample files (v1 and v2, limited and unlimited)."""

from __future__ import annotations

import os
import time
from collections import namedtuple
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from tests._history_rows import add_runs
from tests.conftest import nox_of

from nox_api._version import __version__
from nox_api.engine.base import Result, RunSpec
from nox_api.engine.fake import FakeSandbox
from nox_api.services.cgroup_limits import read_cgroup_limits
from nox_api.services.scanner import StorageScanner, UsageWalk, WorkspaceUsage, walk_usage
from nox_api.services.stats import nearest_rank
from nox_api.services.system import busy_percent
from nox_api.services.tokens import Role
from nox_api.storage.db import Database
from nox_api.storage.models import WorkspaceStorageRow
from noxsdk.models import CgroupLimits, ExecutionStatus

RECENT = datetime.now(UTC) - timedelta(hours=1)
OLD = datetime.now(UTC) - timedelta(hours=48)


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


# --- statistics of runs ------------------------------------------------------------------------

# Workspace a: 20 runs of 10, 20, ... 200 ms; 12 ok, 5 error, 2 timeout, 1 memory_limit;
# 15 python, 5 shell; 14 started an hour ago, 6 two days ago.
A_STATUS = ["ok"] * 12 + ["error"] * 5 + ["timeout"] * 2 + ["memory_limit"]
A_KIND = ["python", "shell"] * 5 + ["python"] * 10
RUNS_A = [
    {
        "id": f"a{i:02d}",
        "workspace": "a",
        "duration_ms": 10.0 * (i + 1),
        "status": A_STATUS[i],
        "kind": A_KIND[i],
        "started_at": RECENT if i < 14 else OLD,
    }
    for i in range(20)
]
# Workspace b: 4 shell runs of 5, 5, 15 and 25 ms, all recent; 3 ok, 1 killed.
RUNS_B = [
    {"id": f"b{i}", "workspace": "b", "kind": "shell", "duration_ms": d, "status": s}
    | {"started_at": RECENT}
    for i, (d, s) in enumerate([(5.0, "ok"), (5.0, "ok"), (15.0, "killed"), (25.0, "ok")])
]


def _statuses(**counts: int) -> dict[str, int]:
    return {s.value: counts.get(s.value, 0) for s in ExecutionStatus}


# Worked out by hand from the rows above (nearest-rank 95th percentile: rank ceil(0.95 n)).
EXPECTED = {
    "a": {
        "total": 20,
        "by_status": _statuses(ok=12, error=5, timeout=2, memory_limit=1),
        "by_kind": {"python": 15, "shell": 5},
        "last_24h": 14,
        "mean_duration_ms": 105.0,  # 2100 / 20
        "p95_duration_ms": 190.0,  # rank 19 of 20
    },
    "b": {
        "total": 4,
        "by_status": _statuses(ok=3, killed=1),
        "by_kind": {"python": 0, "shell": 4},
        "last_24h": 4,
        "mean_duration_ms": 12.5,  # 50 / 4
        "p95_duration_ms": 25.0,  # rank 4 of 4
    },
    None: {
        "total": 24,
        "by_status": _statuses(ok=15, error=5, timeout=2, memory_limit=1, killed=1),
        "by_kind": {"python": 15, "shell": 9},
        "last_24h": 18,
        "mean_duration_ms": pytest.approx(89.583, abs=0.001),  # 2150 / 24
        "p95_duration_ms": 190.0,  # rank 23 of 24: 5 5 10 15 20 25 30 ... 190 200
    },
}


@pytest.fixture
def stats_client(client: TestClient) -> TestClient:
    add_runs(nox_of(client).db, *RUNS_A, *RUNS_B)
    return client


def test_nearest_rank() -> None:
    assert [nearest_rank(n, 95) for n in (1, 4, 19, 20, 21, 24, 100)] == [1, 4, 19, 19, 20, 23, 95]


def test_a_viewer_sees_the_stats_of_its_workspace(
    stats_client: TestClient, make_token: Callable[..., str]
) -> None:
    for ws in ("a", "b"):
        body = stats_client.get("/api/system/stats", headers=_auth(make_token(Role.VIEWER, ws)))
        assert body.status_code == 200, body.text
        assert body.json()["workspace"] == ws
        assert body.json()["executions"] == EXPECTED[ws]
    viewer_b = _auth(make_token(Role.VIEWER, "b"))
    resp = stats_client.get("/api/system/stats", params={"workspace": "a"}, headers=viewer_b)
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "forbidden"


def test_an_admin_sees_every_workspace_or_the_one_it_names(stats_client: TestClient) -> None:
    body = stats_client.get("/api/system/stats").json()
    assert body["workspace"] is None
    assert body["executions"] == EXPECTED[None]
    for ws in ("a", "b"):
        narrowed = stats_client.get("/api/system/stats", params={"workspace": ws}).json()
        assert narrowed["workspace"] == ws
        assert narrowed["executions"] == EXPECTED[ws]


def test_stats_without_runs_and_the_server_fields(client: TestClient) -> None:
    started = time.monotonic()
    body = client.get("/api/system/stats", params={"workspace": "empty"}).json()
    assert body["executions"] == {
        "total": 0,
        "by_status": _statuses(),
        "by_kind": {"python": 0, "shell": 0},
        "last_24h": 0,
        "mean_duration_ms": None,
        "p95_duration_ms": None,
    }
    assert body["files"] == {"count": 0, "bytes": 0, "workspaces": 0, "scanned_at": None}
    assert body["version"] == __version__
    assert body["sandbox"] == {"name": "fake", "isolation": "fake", "available": True}
    assert 0 < body["uptime_s"] < 60
    later = client.get("/api/system/stats").json()["uptime_s"]
    assert later >= body["uptime_s"]
    assert time.monotonic() - started < 5


def test_stats_count_runs_made_over_http(client: TestClient) -> None:
    before = client.get("/api/system/stats").json()["executions"]
    client.post("/run_py", json={"code": "print(1)"})
    client.post("/run_sh", json={"cmd": "exit 2"})
    after = client.get("/api/system/stats").json()["executions"]
    assert after["total"] == before["total"] + 2
    assert after["by_kind"]["shell"] == before["by_kind"]["shell"] + 1
    assert after["by_status"]["error"] == before["by_status"]["error"] + 1
    assert after["last_24h"] == before["last_24h"] + 2


# --- files: the storage scanner ----------------------------------------------------------------


def _tree(root: Path, files: dict[str, int]) -> None:
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


def _files(client: TestClient, **params: str) -> dict[str, Any]:
    files: dict[str, Any] = client.get("/api/system/stats", params=params).json()["files"]
    return files


def test_file_stats_come_from_the_scanner_not_from_the_request(
    client: TestClient, data_dir: Path, make_token: Callable[..., str]
) -> None:
    nox = nox_of(client)
    root = nox.settings.workspaces_dir
    _tree(root / "a", {"one": 100, "sub/two": 200, "sub/deeper/three": 300})
    _tree(root / "b", {"only": 50})
    (root / "a" / "link-to-file").symlink_to(nox.settings.sandbox_python)
    (root / "a" / "link-to-dir").symlink_to("/usr", target_is_directory=True)
    (root / "a" / "loop").symlink_to(root / "a")
    for ws in ("a", "b"):
        nox.stats.mark_dirty(ws)
    assert nox.stats.scanner.settle()
    a = _files(client, workspace="a")
    assert (a["count"], a["bytes"], a["workspaces"]) == (3, 600, 1)
    viewer_b = _auth(make_token(Role.VIEWER, "b"))
    b = client.get("/api/system/stats", headers=viewer_b).json()["files"]
    assert (b["count"], b["bytes"]) == (1, 50)
    every = _files(client)
    folders = [p for p in root.iterdir() if p.is_dir()]
    assert (every["count"], every["bytes"], every["workspaces"]) == (4, 650, len(folders))
    assert datetime.fromisoformat(every["scanned_at"]) <= datetime.now(UTC)

    # a file written behind the server's back is not seen until something marks the workspace
    _tree(root / "a", {"sneaky": 1000})
    assert _files(client, workspace="a")["bytes"] == 600
    nox.stats.mark_dirty("a")
    assert nox.stats.scanner.settle()
    assert (_files(client, workspace="a")["count"], _files(client, workspace="a")["bytes"]) == (
        4,
        1600,
    )


def _wait_files(client: TestClient, workspace: str, count: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := _files(client, workspace=workspace))["count"] != count:
        assert time.monotonic() < deadline, f"files of {workspace} stayed {got}, wanted {count}"
        time.sleep(0.02)


def test_uploads_and_runs_mark_the_workspace_for_a_rescan(
    client: TestClient, fake: FakeSandbox
) -> None:
    nox = nox_of(client)
    nox.stats.scanner.debounce_s = 0.1
    nox.stats.scanner.settle()
    start = _files(client, workspace="default")["count"]
    assert client.post("/put", files={"file": ("up.txt", b"12345")}).status_code == 201
    _wait_files(client, "default", start + 1)

    def writes_a_file(spec: RunSpec) -> Result:
        (spec.workspace / "made-by-run.txt").write_bytes(b"abc")
        return Result(
            status=ExecutionStatus.OK, exit_code=0, stdout=b"", stderr=b"",
            stdout_truncated=False, stderr_truncated=False, duration_ms=1.0, cpu_ms=1.0,
        )  # fmt: skip

    fake.handler = writes_a_file
    assert client.post("/run_py", json={"code": "write"}).status_code == 200
    _wait_files(client, "default", start + 2)
    assert _files(client, workspace="default")["bytes"] >= 8


@pytest.fixture
def db(data_dir: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{data_dir / 's.db'}")
    database.migrate()
    yield database
    database.close()


def _rows(db: Database) -> dict[str, tuple[int, int]]:
    with db.session() as s:
        return {r.workspace: (r.files, r.bytes) for r in s.scalars(select(WorkspaceStorageRow))}


def test_the_scanner_scans_at_start_and_forgets_removed_workspaces(
    db: Database, data_dir: Path
) -> None:
    root = data_dir / "ws"
    _tree(root / "x", {"f": 10, "g/h": 20})
    _tree(root / "y", {"f": 5})
    with db.session() as s:
        s.add(WorkspaceStorageRow(workspace="gone", files=9, bytes=9, scanned_at=datetime.now(UTC)))
    scanner = StorageScanner(db, root, debounce_s=30)
    scanner.start()
    try:
        assert scanner.settle(5)
        assert _rows(db) == {"x": (2, 30), "y": (1, 5)}
        for path in (root / "y").iterdir():
            path.unlink()
        (root / "y").rmdir()
        scanner.mark_dirty("y")
        assert scanner.settle(5)  # settle does not wait out the 30 s debounce
        assert _rows(db) == {"x": (2, 30)}
        # after a restore, say: every folder and every known row is looked at again
        _tree(root / "x", {"new": 1})
        _tree(root / "z", {"f": 7})
        with db.session() as s:
            s.add(
                WorkspaceStorageRow(workspace="old", files=1, bytes=1, scanned_at=datetime.now(UTC))
            )
        scanner.mark_all()
        assert scanner.settle(5)
        assert _rows(db) == {"x": (3, 31), "z": (1, 7)}
    finally:
        scanner.close()
    assert not scanner.running


def test_marks_within_the_debounce_coalesce_into_one_scan(db: Database, data_dir: Path) -> None:
    root = data_dir / "ws"
    _tree(root / "x", {"f": 1})
    scans: list[str] = []

    class Counting(StorageScanner):
        def scan(self, workspace: str) -> WorkspaceUsage | None:
            scans.append(workspace)
            return super().scan(workspace)

    scanner = Counting(db, root, debounce_s=0.3)
    scanner.start()
    try:
        assert scanner.settle(5)
        scans.clear()
        marked = time.monotonic()
        for _ in range(5):
            scanner.mark_dirty("x")
            time.sleep(0.02)
        time.sleep(0.1)
        assert scans == []  # not before the debounce ran out
        deadline = time.monotonic() + 5
        while not scans:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert time.monotonic() - marked >= 0.3
        time.sleep(0.4)
        assert scans == ["x"]
    finally:
        scanner.close()


def test_a_walk_goes_in_bounded_steps_and_follows_no_link(data_dir: Path) -> None:
    root = data_dir / "big"
    _tree(root, {f"d{i % 3}/f{i}": i for i in range(40)} | {"flat/" + str(i): 1 for i in range(25)})
    (root / "up").symlink_to(data_dir, target_is_directory=True)
    (root / "big-file").symlink_to("/usr/bin/env")
    expected = WorkspaceUsage(files=65, bytes=sum(range(40)) + 25)
    assert walk_usage(root) == expected
    walk = UsageWalk(root)
    steps = []
    while not walk.done:
        steps.append(walk.step(7))
    assert all(seen <= 7 for seen in steps)
    assert len(steps) >= (65 + 6) // 7  # 65 files, 4 folders, 2 links: many small steps
    assert WorkspaceUsage(walk.files, walk.bytes) == expected


def test_a_scan_in_small_steps_stores_the_whole_count(db: Database, data_dir: Path) -> None:
    root = data_dir / "ws"
    _tree(root / "x", {f"f{i}": 3 for i in range(50)})
    scanner = StorageScanner(db, root, entries_per_step=4, pause_s=0.0)
    assert scanner.scan("x") == WorkspaceUsage(50, 150)
    assert scanner.scan("../etc") is None
    assert scanner.scan("missing") is None
    assert _rows(db) == {"x": (50, 150)}


# --- resources ---------------------------------------------------------------------------------


def test_resources_are_present_and_sane(client: TestClient, make_token: Callable[..., str]) -> None:
    viewer = _auth(make_token(Role.VIEWER, "v"))
    timings = []
    for _ in range(3):
        started = time.monotonic()
        resp = client.get("/api/system/resources", headers=viewer)
        timings.append(time.monotonic() - started)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert 0 <= body["cpu_percent"] <= 100
        assert body["cpu_count"] >= 1
        assert len(body["load_average"]) == 3
        assert all(x >= 0 for x in body["load_average"])
        mem = body["memory"]
        assert 0 < mem["available_bytes"] <= mem["total_bytes"]
        assert 0 <= mem["used_percent"] <= 100
        disk = body["disk"]
        assert disk["total_bytes"] > 0
        assert 0 <= disk["free_bytes"] <= disk["total_bytes"]
        assert 0 < disk["used_bytes"] <= disk["total_bytes"]
        assert 0 <= disk["used_percent"] <= 100
        if body["cgroup"] is not None:
            CgroupLimits.model_validate(body["cgroup"])
    assert max(timings) < 1.0, timings  # no request waits long for a CPU sample


def test_resources_describe_the_data_folder_disk(client: TestClient) -> None:
    st = os.statvfs(nox_of(client).settings.data_path)
    disk = client.get("/api/system/resources").json()["disk"]
    assert disk["total_bytes"] == st.f_blocks * st.f_frsize


Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")


def test_busy_percent_of_two_samples() -> None:
    before = Times(100, 0, 50, 800, 50, 0, 0, 0, 10, 0)
    # +30 user, +10 system, +40 idle, +20 iowait, +5 guest (already inside user)
    after = Times(130, 0, 60, 840, 70, 0, 0, 0, 15, 0)
    assert busy_percent(before, after) == 40.0  # 40 busy of 100
    assert busy_percent(after, after) == 0.0
    assert busy_percent(before, Times(200, 0, 50, 800, 50, 0, 0, 0, 10, 0)) == 100.0


# --- cgroup limits on sample files ------------------------------------------------------------


def _cgroup_host(
    tmp: Path, proc: str, mounts: list[tuple[str, str, str, str]], files: dict[str, str]
) -> tuple[Path, Path]:
    """Sample /proc/self/cgroup and mountinfo; ``mounts`` are (root, point below tmp, fstype,
    options); ``files`` map paths below tmp to their text."""
    for rel, text in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    lines = [
        f"{30 + n} 23 0:{26 + n} {root} {tmp / point} rw,nosuid - {fstype} {fstype} {options}"
        for n, (root, point, fstype, options) in enumerate(mounts)
    ]
    info = tmp / "mountinfo"
    info.write_text("25 1 8:1 / / rw - ext4 /dev/sda1 rw\n" + "\n".join(lines) + "\n")
    cgroup = tmp / "cgroup"
    cgroup.write_text(proc)
    for _root, point, _fs, _opt in mounts:
        (tmp / point).mkdir(parents=True, exist_ok=True)
    return cgroup, info


V2 = [("/", "cg", "cgroup2", "rw,nsdelegate")]


def test_cgroup_v2_limited(tmp_path: Path) -> None:
    files = {
        "cg/system.slice/nox.service/memory.max": "536870912",
        "cg/system.slice/nox.service/cpu.max": "150000 100000",
    }
    paths = _cgroup_host(tmp_path, "0::/system.slice/nox.service\n", V2, files)
    assert read_cgroup_limits(*paths) == CgroupLimits(
        version="v2", memory_limit_bytes=536870912, cpu_quota_cores=1.5
    )


def test_cgroup_v2_unlimited(tmp_path: Path) -> None:
    files = {"cg/user.slice/memory.max": "max", "cg/user.slice/cpu.max": "max 100000"}
    paths = _cgroup_host(tmp_path, "0::/user.slice\n", V2, files)
    assert read_cgroup_limits(*paths) == CgroupLimits(
        version="v2", memory_limit_bytes="none", cpu_quota_cores="none"
    )


def test_cgroup_v2_limit_set_above_the_servers_own_group(tmp_path: Path) -> None:
    files = {
        "cg/svc/memory.max": "1073741824",
        "cg/svc/cpu.max": "50000 100000",
        "cg/svc/nox-server/memory.max": "max",
        "cg/svc/nox-server/cpu.max": "200000 100000",
    }
    paths = _cgroup_host(tmp_path, "0::/svc/nox-server\n", V2, files)
    assert read_cgroup_limits(*paths) == CgroupLimits(
        version="v2", memory_limit_bytes=1073741824, cpu_quota_cores=0.5
    )


def test_cgroup_v2_in_a_container_that_sees_part_of_the_hierarchy(tmp_path: Path) -> None:
    files = {"cg/memory.max": "268435456", "cg/cpu.max": "max 100000"}
    mounts = [("/docker/abc", "cg", "cgroup2", "rw")]
    paths = _cgroup_host(tmp_path, "0::/docker/abc\n", mounts, files)
    assert read_cgroup_limits(*paths) == CgroupLimits(
        version="v2", memory_limit_bytes=268435456, cpu_quota_cores="none"
    )


V1_MOUNTS = [
    ("/", "v1/memory", "cgroup", "rw,memory"),
    ("/", "v1/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
    ("/", "v1/pids", "cgroup", "rw,pids"),
    ("/", "unified", "cgroup2", "rw"),
]
V1_PROC = "12:pids:/grp\n4:memory:/grp\n3:cpu,cpuacct:/grp\n0::/grp\n"


def test_cgroup_v1_limited(tmp_path: Path) -> None:
    files = {
        "v1/memory/grp/memory.limit_in_bytes": "268435456",
        "v1/cpu,cpuacct/grp/cpu.cfs_quota_us": "50000",
        "v1/cpu,cpuacct/grp/cpu.cfs_period_us": "100000",
    }
    paths = _cgroup_host(tmp_path, V1_PROC, V1_MOUNTS, files)
    assert read_cgroup_limits(*paths) == CgroupLimits(
        version="v1", memory_limit_bytes=268435456, cpu_quota_cores=0.5
    )


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    files = {
        "v1/memory/memory.limit_in_bytes": "9223372036854771712",
        "v1/memory/grp/memory.limit_in_bytes": "9223372036854771712",
        "v1/cpu,cpuacct/grp/cpu.cfs_quota_us": "-1",
        "v1/cpu,cpuacct/grp/cpu.cfs_period_us": "100000",
    }
    paths = _cgroup_host(tmp_path, V1_PROC, V1_MOUNTS, files)
    assert read_cgroup_limits(*paths) == CgroupLimits(
        version="v1", memory_limit_bytes="none", cpu_quota_cores="none"
    )


def test_no_cgroup_to_read(tmp_path: Path) -> None:
    paths = _cgroup_host(tmp_path, "", [], {})
    assert read_cgroup_limits(*paths) is None
    assert read_cgroup_limits(tmp_path / "absent", paths[1]) is None


def test_a_folder_swapped_for_a_link_between_steps_is_not_followed(tmp_path: Path) -> None:
    """The walk pauses between steps; sandboxed code may swap a queued folder for a link to
    another tenant's or the host's folder meanwhile. Its files must not be counted."""
    root = tmp_path / "ws"
    (root / "a").mkdir(parents=True)
    (root / "mine.txt").write_bytes(b"12345")
    outside = tmp_path / "other-tenant"
    outside.mkdir()
    for i in range(20):
        (outside / f"secret{i}").write_bytes(b"x" * 100)
    walk = UsageWalk(root)
    walk.step(1)  # reads one entry of the root; "a" may be queued by now
    while walk.step(1) and walk.files + len(walk._stack) < 2:
        pass
    (root / "a").rmdir()
    (root / "a").symlink_to(outside)
    while not walk.done:
        walk.step(1)
    assert (walk.files, walk.bytes) == (1, 5)
    assert walk_usage(root) == WorkspaceUsage(1, 5)  # a link is never followed
