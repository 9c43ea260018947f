"""Every ``noxctl`` command against the live server, as people read it and with ``--json``.

In-process through typer's ``CliRunner``: the same ``main`` as the console script, with stdout
and stderr kept apart. The backup commands come last: a restore rewinds the server's data.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from typer.testing import Result

import noxsdk
from noxsdk import Execution, ExecutionDetail, FileInfo, SystemStats

from .conftest import CODE_BYTES_MAX, Live, noxctl

pytestmark = pytest.mark.sandbox

T = TypeVar("T")


def _json(result: Result) -> Any:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr == ""
    return json.loads(result.stdout)


def _ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result.stdout


def _fails(result: Result, code: int, start: str) -> str:
    """The one error line of a failed command, checked."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"noxctl: error: {start}"), lines[0]
    return lines[0]


def _eventually(probe: Callable[[], T | None], seconds: float = 5.0) -> T:
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value is not None:
            return value
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.05)


def _row(text: str, name: str) -> str:
    """The value of ``name`` in a two-column table of names and values."""
    match = re.search(rf"^{re.escape(name)}\s+(.*)$", text, re.MULTILINE)
    assert match, text
    return match.group(1)


# -- the server and the token --


def test_health(live: Live) -> None:
    assert _ok(noxctl(live, "health", token="")) == f"ok: Nox {noxsdk.__version__} at {live.url}\n"
    expected = {"status": "ok", "version": noxsdk.__version__}
    assert _json(noxctl(live, "health", "--json", token="")) == expected
    assert _json(noxctl(live, "--json", "health", token="")) == expected  # before the command

    detailed = _ok(noxctl(live, "health", "--detailed", token=live.viewer))
    assert re.match(r"health: (ok|degraded)\n", detailed)
    for check in ("database", "sandbox", "disk", "audit", "policy"):
        assert re.search(rf"^{check}\s+(ok|degraded)\s+\S", detailed, re.MULTILINE), detailed
    report = _json(noxctl(live, "health", "-d", "--json", token=live.viewer))
    assert set(report["checks"]) == {"database", "sandbox", "disk", "audit", "policy"}
    assert report["checks"]["sandbox"]["status"] == "ok"


def test_whoami(live: Live) -> None:
    text = _ok(noxctl(live, "whoami", token=live.runner))
    assert _row(text, "name") == "test-runner"
    assert _row(text, "role") == "runner"
    assert _row(text, "workspace") == "default"
    assert _row(text, "server") == live.url
    me = _json(noxctl(live, "whoami", "--json", token=live.viewer))
    assert (me["name"], me["role"], me["workspace"]) == ("test-viewer", "viewer", "default")
    assert _row(text, "token id") != me["id"]


# -- runs --


def test_run_py_takes_code_from_an_option_a_file_or_stdin(live: Live, tmp_path: Path) -> None:
    code = "import sys; print('out é ✓'); print('err', file=sys.stderr)"
    result = noxctl(live, "run-py", "-c", code, token=live.runner)
    assert (result.exit_code, result.stdout, result.stderr) == (0, "out é ✓\n", "err\n")

    script = tmp_path / "shout.py"
    script.write_text("import os\nprint(input().upper(), os.environ['GREETING'])\n")
    given = tmp_path / "in.txt"
    given.write_text("hello\n")
    result = noxctl(
        live, "run-py", str(script), "--stdin-file", str(given), "-e", "GREETING=hi there",
        token=live.runner,
    )  # fmt: skip
    assert _ok(result) == "HELLO hi there\n"
    assert _ok(noxctl(live, "run-py", "-", stdin="print(6 * 7)\n")) == "42\n"
    backwards = ["run-py", "-c", "print(input()[::-1])", "--stdin-file", "-"]
    assert _ok(noxctl(live, *backwards, stdin="abc")) == "cba\n"


def test_run_py_exits_with_the_programs_code_in_both_forms(live: Live) -> None:
    failing = "import sys; print('partial'); sys.exit(7)"
    result = noxctl(live, "run-py", "-c", failing, token=live.runner)
    assert (result.exit_code, result.stdout, result.stderr) == (7, "partial\n", "")
    result = noxctl(live, "run-py", "--json", "-c", failing, token=live.runner)
    assert result.exit_code == 7
    execution = Execution.model_validate_json(result.stdout)
    assert (execution.status, execution.exit_code, execution.stdout) == ("error", 7, "partial\n")
    raised = noxctl(live, "run-py", "-c", "raise SystemExit('boom')")
    assert (raised.exit_code, raised.stderr) == (1, "boom\n")


def test_run_py_json_prints_the_execution(live: Live) -> None:
    execution = Execution.model_validate(_json(noxctl(live, "run-py", "--json", "-c", "print(1)")))
    assert (execution.kind, execution.status, execution.stdout) == ("python", "ok", "1\n")
    assert execution.actor == "test-admin"


def test_run_sh(live: Live) -> None:
    result = noxctl(live, "run-sh", "echo $((6 * 7)); echo oops >&2; exit 3", token=live.runner)
    assert (result.exit_code, result.stdout, result.stderr) == (3, "42\n", "oops\n")
    assert _ok(noxctl(live, "run-sh", "echo", "a", "b")) == "a b\n"  # words joined, as ssh
    assert _ok(noxctl(live, "run-sh", "--", "ls", "-d", "/workspace")) == "/workspace\n"
    assert _ok(noxctl(live, "run-sh", "-", stdin="echo from stdin\n")) == "from stdin\n"
    assert _ok(noxctl(live, "run-sh", "-e", "X=1", "--", "echo $X")) == "1\n"
    doc = _json(noxctl(live, "run-sh", "--json", "cat", "--stdin-file", "-", stdin="piped"))
    assert (doc["kind"], doc["status"], doc["stdout"]) == ("shell", "ok", "piped")


def test_run_errors(live: Live) -> None:
    _fails(noxctl(live, "run-py", "-c", "print(1)", token=live.viewer), 3, "HTTP 403 forbidden")
    too_big = "#" * (CODE_BYTES_MAX + 1)
    _fails(noxctl(live, "run-py", "-c", too_big), 5, "HTTP 413 payload_too_large")
    _fails(noxctl(live, "run-py", "-c", "1", "--timeout", "61"), 2, "HTTP 400 invalid_request")
    _fails(noxctl(live, "run-py", "-c", "1", "--memory", "0"), 2, "Invalid value for '--memory'")
    _fails(noxctl(live, "run-py", "-c", "1", "-e", "NOEQUALS"), 2, "Invalid value for '--env'")
    _fails(noxctl(live, "run-py"), 2, "Invalid value for FILE")
    _fails(noxctl(live, "run-py", "nowhere.py"), 2, "Invalid value for FILE: cannot read")
    _fails(noxctl(live, "run-py", "x.py", "-c", "1"), 2, "Invalid value for '--code'")
    _fails(noxctl(live, "run-sh"), 2, "Invalid value for COMMAND")
    error = json.loads(noxctl(live, "run-py", "--json", "-c", too_big).stderr)["error"]
    assert (error["code"], error["exit_code"], error["status"]) == ("payload_too_large", 5, 413)
    assert error["request_id"]


# -- files --


def test_put_ls_cat_rm(live: Live, tmp_path: Path) -> None:
    blob = os.urandom(300_000)
    local = tmp_path / "blob.bin"
    local.write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    stored = _ok(noxctl(live, "put", str(local), "cli/", token=live.runner))
    assert stored == f"cli/blob.bin  293.0 KiB  sha256 {digest}\n"
    notes = tmp_path / "notes.txt"
    notes.write_text("alpha\nneedle here\n")
    info = FileInfo.model_validate(
        _json(noxctl(live, "put", str(notes), "cli/sub/notes.txt", "--json"))
    )
    assert (info.path, info.size, info.type) == ("cli/sub/notes.txt", 18, "file")
    assert info.sha256 == hashlib.sha256(notes.read_bytes()).hexdigest()
    piped = _json(noxctl(live, "put", "-", "cli/piped.txt", "--json", stdin="from stdin"))
    assert piped["size"] == 10

    listing = _ok(noxctl(live, "ls", "cli", token=live.viewer))
    assert listing.splitlines()[0].split() == ["type", "size", "modified", "path"]
    assert re.search(r"^file\s+293\.0 KiB\s+\S+ \S+\s+cli/blob\.bin$", listing, re.MULTILINE)
    assert re.search(r"^dir\s+-\s+\S+ \S+\s+cli/sub/$", listing, re.MULTILINE)
    tree = _json(noxctl(live, "ls", "-r", "cli", "--json"))
    assert {e["path"] for e in tree["entries"]} == {
        "cli/blob.bin", "cli/piped.txt", "cli/sub", "cli/sub/notes.txt",
    }  # fmt: skip
    assert "cli/sub/notes.txt" in _ok(noxctl(live, "ls", "--recursive"))

    assert noxctl(live, "cat", "cli/blob.bin", token=live.viewer).stdout_bytes == blob
    text = _json(noxctl(live, "cat", "cli/sub/notes.txt", "--json"))
    assert text == {"path": "cli/sub/notes.txt", "size": 18, "encoding": "utf-8",
                    "content": "alpha\nneedle here\n"}  # fmt: skip
    binary = _json(noxctl(live, "cat", "cli/blob.bin", "--json"))
    assert binary["encoding"] == "base64"
    assert base64.b64decode(binary["content"]) == blob
    saved = noxctl(live, "cat", "cli/blob.bin", "-o", str(tmp_path / "copy.bin"))
    assert saved.exit_code == 0
    assert saved.stderr == f"noxctl: saved cli/blob.bin to {tmp_path / 'copy.bin'} (293.0 KiB)\n"
    assert (tmp_path / "copy.bin").read_bytes() == blob
    into = tmp_path / "into"
    into.mkdir()
    doc = _json(noxctl(live, "cat", "cli/sub/notes.txt", "-o", str(into), "--json"))
    assert doc == {"path": "cli/sub/notes.txt", "size": 18, "saved_to": str(into / "notes.txt")}
    assert (into / "notes.txt").read_text() == "alpha\nneedle here\n"

    line = _fails(noxctl(live, "rm", "cli"), 1, "HTTP 409 conflict")
    assert line.endswith("(hint: add -r to remove the folder and all in it)")
    assert _json(noxctl(live, "rm", "cli/piped.txt", "--json")) == {"deleted": "cli/piped.txt"}
    assert _ok(noxctl(live, "rm", "-r", "cli", token=live.runner)) == "removed cli\n"
    _fails(noxctl(live, "ls", "cli"), 4, "HTTP 404 not_found")
    _fails(noxctl(live, "cat", "cli/blob.bin"), 4, "HTTP 404 not_found")
    _fails(noxctl(live, "rm", "anything", token=live.viewer), 3, "HTTP 403 forbidden")
    _fails(noxctl(live, "put", str(local), token=live.viewer), 3, "HTTP 403 forbidden")
    _fails(noxctl(live, "put", "-"), 2, "Invalid value for DEST")
    _fails(noxctl(live, "put", str(tmp_path / "missing")), 2, "Invalid value for SOURCE")
    assert not list(into.glob(".*.part"))
    assert not list(tmp_path.glob(".*.part"))


def test_search(live: Live, tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("alpha\nthe needle is here\nomega\n")
    _ok(noxctl(live, "put", str(notes), "found/notes.md"))
    text = _ok(noxctl(live, "search", "needle", token=live.viewer))
    assert re.search(r"^found/notes\.md\s+2\s+the needle is here$", text, re.MULTILINE), text
    doc = _json(noxctl(live, "search", "ne+dle", "--regex", "--glob", "*.md", "--json"))
    assert doc == {"matches": [{"path": "found/notes.md", "line": 2,
                                "text": "the needle is here"}], "truncated": False}  # fmt: skip
    by_name = _json(noxctl(live, "search", "", "-g", "notes.*", "--json"))
    assert [m["path"] for m in by_name["matches"]] == ["found/notes.md"]
    assert _ok(noxctl(live, "search", "no such text anywhere")) == "(no matches)\n"
    limited = _json(noxctl(live, "search", "e", "-m", "1", "--json"))
    assert len(limited["matches"]) == 1
    assert limited["truncated"] is True


# -- history, status, logs, clean --


def test_history(live: Live) -> None:
    marker = uuid.uuid4().hex
    ran = _json(noxctl(live, "run-py", "--json", "-c", f"print('{marker}')", token=live.runner))

    def listed() -> dict[str, Any] | None:
        page: dict[str, Any] = _json(noxctl(live, "history", "--json", "-n", "5"))
        return page if any(i["id"] == ran["id"] for i in page["items"]) else None

    page = _eventually(listed)
    assert page["total"] >= 1
    assert "stdout" not in page["items"][0]
    text = _ok(noxctl(live, "history", "-n", "5", token=live.viewer))
    header = text.splitlines()[0].split()
    assert header == ["id", "started", "kind", "status", "exit", "ms", "actor"]
    assert re.search(rf"^{ran['id']}\s+\S+ \S+\s+python\s+ok\s+0\s+[\d.]+\s+test-runner$",
                     text, re.MULTILINE), text  # fmt: skip

    detail = ExecutionDetail.model_validate(_json(noxctl(live, "history", ran["id"], "--json")))
    assert (detail.code, detail.stdout) == (f"print('{marker}')", f"{marker}\n")
    shown = _ok(noxctl(live, "history", ran["id"]))
    assert _row(shown, "status") == "ok"
    assert f"── code ──\nprint('{marker}')\n── stdout ──\n{marker}\n── stderr ──\n" in shown

    assert noxctl(live, "run-sh", "exit 9").exit_code == 9

    def failed_shell_runs() -> dict[str, Any] | None:
        args = ["history", "--json", "--status", "error", "--kind", "shell"]
        found: dict[str, Any] = _json(noxctl(live, *args))
        return found if found["items"] else None

    errors = _eventually(failed_shell_runs)
    assert {(i["status"], i["kind"]) for i in errors["items"]} == {("error", "shell")}
    _fails(noxctl(live, "history", "0123456789abcdef"), 4, "HTTP 404 not_found")
    _fails(noxctl(live, "history", "--status", "weird"), 2, "Invalid value for '--status'")


def test_status(live: Live) -> None:
    text = _ok(noxctl(live, "status", token=live.viewer))
    assert re.match(rf"Nox {re.escape(noxsdk.__version__)}, up \d+ s$", _row(text, "server"))
    assert _row(text, "workspace") == "default"
    assert re.match(r"\d+ \(\d+ in the last 24 h\)$", _row(text, "runs"))
    assert _row(text, "sandbox").startswith("bwrap (")
    doc = _json(noxctl(live, "status", "--json"))
    assert set(doc) == {"stats"}
    stats = SystemStats.model_validate(doc["stats"])
    assert stats.workspace is None  # an admin without --workspace: every workspace
    full = _json(noxctl(live, "status", "--full", "--json", "-w", "default"))
    assert set(full) == {"stats", "resources", "health"}
    assert full["stats"]["workspace"] == "default"
    assert full["resources"]["cpu_count"] >= 1
    text = _ok(noxctl(live, "status", "--full"))
    assert "resources" in text.splitlines()
    assert re.search(r"^disk\s+[\d.]+ % used", text, re.MULTILINE)
    assert re.search(r"^sandbox\s+ok\s+", text, re.MULTILINE)


def test_logs(live: Live) -> None:
    lines = _json(noxctl(live, "logs", "-n", "3", "--json"))["lines"]
    assert 1 <= len(lines) <= 3
    records = [json.loads(line) for line in lines]
    text = _ok(noxctl(live, "logs", "--tail", "3")).splitlines()
    assert 1 <= len(text) <= 3
    assert all(not line.startswith("{") for line in text)
    assert re.match(r"\S+ (INFO|WARNING|ERROR|DEBUG) \S+: ", text[0]), text[0]
    assert records[0]["time"] in _ok(noxctl(live, "logs", "-n", "5"))
    followed = _ok(noxctl(live, "logs", "-n", "2", "--follow", "--duration", "0.5")).splitlines()
    assert len(followed) >= 2  # the tail at least; the stream may bring nothing in 0.5 s
    assert all(re.match(r"\S+ [A-Z]+ \S+: ", line) for line in followed), followed
    _fails(noxctl(live, "logs", token=live.runner), 3, "HTTP 403 forbidden")


def test_sandbox_clean(live: Live, tmp_path: Path) -> None:
    old = tmp_path / "old.txt"
    old.write_text("x" * 100)
    _ok(noxctl(live, "put", str(old), "-w", "cleanme"))
    text = _ok(noxctl(live, "sandbox-clean", "--older-than", "0", "--dry-run", "-w", "cleanme"))
    assert text.startswith("would remove ")
    assert "  workspaces/cleanme/old.txt\n" in text
    doc = _json(noxctl(live, "sandbox-clean", "--older-than", "0", "-w", "cleanme", "--json"))
    assert doc["dry_run"] is False
    assert "workspaces/cleanme/old.txt" in doc["paths"]
    assert doc["freed_bytes"] >= 100
    assert _json(noxctl(live, "ls", "-w", "cleanme", "--json"))["entries"] == []
    assert _ok(noxctl(live, "sandbox-clean")).startswith("removed ")
    _fails(noxctl(live, "sandbox-clean", token=live.runner), 3, "HTTP 403 forbidden")


# -- administration --


def test_tokens(live: Live) -> None:
    made = _json(noxctl(live, "token", "create", "--name", "cli-made", "--role", "viewer",
                        "-w", "team", "--expires-in-days", "2", "--json"))  # fmt: skip
    assert (made["name"], made["role"], made["workspace"]) == ("cli-made", "viewer", "team")
    assert made["expires_at"]
    me = _json(noxctl(live, "whoami", "--json", token=made["token"]))
    assert (me["id"], me["role"]) == (made["id"], "viewer")

    created = noxctl(live, "token", "create", "--name", "cli-plain")
    assert created.exit_code == 0
    secret = created.stdout.strip()
    assert created.stdout == secret + "\n"  # only the secret: TOKEN=$(noxctl token create ...)
    assert "runner, workspace default" in created.stderr
    assert "shown this once" in created.stderr
    assert _json(noxctl(live, "whoami", "--json", token=secret))["name"] == "cli-plain"

    items = _json(noxctl(live, "token", "list", "--json"))["items"]
    assert {"cli-made", "cli-plain", "test-runner"} <= {t["name"] for t in items}
    assert "token" not in items[0]
    assert (
        _json(noxctl(live, "token", "list", "-w", "team", "--json"))["items"][0]["id"]
        == (made["id"])
    )
    table = _ok(noxctl(live, "token", "list"))
    assert re.search(rf"^{made['id']}\s+cli-made\s+viewer\s+team\s+.*\sactive$", table, re.M)

    assert _json(noxctl(live, "token", "revoke", made["id"], "--json")) == {"revoked": made["id"]}
    plain_id = _json(noxctl(live, "whoami", "--json", token=secret))["id"]
    assert _ok(noxctl(live, "token", "revoke", plain_id)) == f"revoked {plain_id}\n"
    line = _fails(noxctl(live, "whoami", token=secret), 3, "HTTP 401 unauthorized")
    assert line.endswith("(hint: check NOX_API_TOKEN / --token)")
    assert re.search(rf"^{made['id']}\s+cli-made\s.*\srevoked$", _ok(noxctl(live, "token", "list")),
                     re.MULTILINE)  # fmt: skip
    _fails(noxctl(live, "token", "revoke", "0123456789abcdef"), 4, "HTTP 404 not_found")
    _fails(noxctl(live, "token", "list", token=live.runner), 3, "HTTP 403 forbidden")
    _fails(noxctl(live, "token", "create", "--name", "x", "--role", "king"), 2, "Invalid value")
    assert noxctl(live, "token").exit_code == 2  # no subcommand: its help


def test_audit(live: Live) -> None:
    _ok(noxctl(live, "token", "create", "--name", "audited"))
    entries = _json(noxctl(live, "audit", "--action", "token.create", "-n", "50", "--json"))
    assert entries["items"]
    assert {e["action"] for e in entries["items"]} == {"token.create"}
    seqs = [e["seq"] for e in entries["items"]]
    assert seqs == sorted(seqs, reverse=True)  # newest first
    text = _ok(noxctl(live, "audit", "-n", "3"))
    assert text.splitlines()[0].split() == [
        "seq", "time", "action", "outcome", "actor", "workspace", "target",
    ]  # fmt: skip
    assert len(text.splitlines()) == 4
    assert re.search(r"\stoken\.create\s+ok\s+test-admin\s", _ok(noxctl(live, "audit", "-n", "50")))

    assert re.fullmatch(r"intact: \d+ entries\n", _ok(noxctl(live, "audit", "verify")))
    verdict = _json(noxctl(live, "audit", "verify", "--json"))
    assert verdict["ok"] is True
    assert verdict["entries"] >= len(seqs)
    _fails(noxctl(live, "audit", "verify", token=live.viewer), 3, "HTTP 403 forbidden")


def test_policy(live: Live) -> None:
    policy = _json(noxctl(live, "policy", "--json"))
    assert policy["limits"]["maxima"]["code_bytes"] == CODE_BYTES_MAX
    assert f'"code_bytes": {CODE_BYTES_MAX}' in _ok(noxctl(live, "policy"))
    assert _json(noxctl(live, "policy", "reload", "--json")) == policy
    reloaded = noxctl(live, "policy", "reload")
    assert reloaded.exit_code == 0
    assert reloaded.stderr == "noxctl: the policy was reloaded\n"
    assert json.loads(reloaded.stdout) == policy
    _fails(noxctl(live, "policy", token=live.runner), 3, "HTTP 403 forbidden")


def test_usage_errors(live: Live) -> None:
    line = _fails(noxctl(live, "ls", "--bogus"), 2, "No such option: --bogus")
    assert line.endswith("(hint: see 'noxctl ls --help')")
    error = json.loads(noxctl(live, "ls", "--bogus", "--json").stderr)["error"]
    assert (error["code"], error["exit_code"]) == ("usage", 2)
    _fails(noxctl(live, "frobnicate"), 2, "No such command 'frobnicate'")
    bare = noxctl(live)
    assert bare.exit_code == 2
    assert "Usage: noxctl [OPTIONS] COMMAND [ARGS]..." in bare.stdout
    assert _ok(noxctl(live, "--version")) == f"noxctl {noxsdk.__version__}\n"


# -- backups: last, a restore rewinds the server's data --


def test_backups(live: Live) -> None:
    first = _json(noxctl(live, "backup", "cli-one", "--json"))
    assert first["name"] == "cli-one"
    assert re.fullmatch(r"[0-9a-f]{64}", first["sha256"])
    text = _ok(noxctl(live, "backup", "cli-two"))
    assert _row(text, "backup") == "cli-two"
    assert re.fullmatch(r"[0-9a-f]{64}", _row(text, "sha256"))
    _fails(noxctl(live, "backup", "cli-one"), 1, "HTTP 409 conflict")
    _fails(noxctl(live, "backup", "bad name!"), 2, "")

    names = [b["name"] for b in _json(noxctl(live, "backups", "--json"))["items"]]
    assert {"cli-one", "cli-two"} <= set(names)
    listing = _ok(noxctl(live, "backups"))
    assert re.search(rf"^cli-one\s+[\d.]+ \S+\s+\S+ \S+\s+{first['sha256']}$", listing, re.M)

    _fails(noxctl(live, "restore", "cli-one"), 2, "restore replaces the server's data")
    refused = json.loads(noxctl(live, "restore", "cli-one", "--json").stderr)["error"]
    assert (refused["exit_code"], refused["hint"]) == (2, "pass --yes to confirm it")
    _fails(noxctl(live, "restore", "nothing-here", "--yes"), 4, "HTTP 404 not_found")
    done = _json(noxctl(live, "restore", "cli-one", "--yes", "--json"))
    assert done["pre_restore"].startswith("pre-restore")
    assert done["restored"]["tokens"] >= 3
    text = _ok(noxctl(live, "restore", "cli-two", "-y"))
    assert _row(text, "restored") == "cli-two"
    assert _row(text, "before it").startswith("backup pre-restore")
    assert _json(noxctl(live, "whoami", "--json", token=live.runner))["name"] == "test-runner"
    _fails(noxctl(live, "backups", token=live.runner), 3, "HTTP 403 forbidden")
