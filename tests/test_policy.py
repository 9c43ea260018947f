"""The policy file: schema, error messages, the shipped defaults and the reloading store."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from nox_api.errors import InvalidRequest
from nox_api.services.policy import (
    MAX_POLICY_BYTES,
    Policy,
    PolicyError,
    PolicyStore,
    WorkspaceQuota,
    install_sighup,
    load_policy,
    parse_policy,
)
from nox_api.services.tokens import Role

SHIPPED = Path(__file__).resolve().parents[1] / "policy" / "policies.yaml"


def refused(text: str) -> str:
    """The message of the PolicyError that ``text`` raises."""
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policies.yaml")
    return info.value.message


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def key_paths(data: Any, prefix: str = "") -> set[str]:
    if not isinstance(data, dict) or not data:
        return {prefix}
    paths: set[str] = set()
    for key, value in data.items():
        paths |= key_paths(value, f"{prefix}.{key}")
    return paths


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text("")
    return path


@pytest.fixture
def store(policy_file: Path) -> Iterator[PolicyStore]:
    s = PolicyStore(policy_file)
    yield s
    s.stop_watching()


# --- the shipped file and defaults ---------------------------------------------------------------


def test_shipped_file_is_exactly_the_defaults() -> None:
    assert load_policy(SHIPPED) == Policy()


def test_shipped_file_sets_every_field_with_a_comment() -> None:
    raw = yaml.safe_load(SHIPPED.read_text())
    assert key_paths(raw) == key_paths(Policy().to_public_dict())
    lines = SHIPPED.read_text().splitlines()
    assert lines[0].startswith("#")
    fields = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert fields
    assert [line for line in fields if " # " not in line] == []


@pytest.mark.parametrize("text", ["", "{}", "# only a comment\n", "---\n", "limits:\nshell: {}\n"])
def test_empty_file_or_sections_are_the_defaults(text: str) -> None:
    assert parse_policy(text) == Policy()


def test_defaults_are_safe() -> None:
    p = Policy()
    assert p.limits.network is False
    assert p.limits.defaults.timeout_s == 10
    assert p.limits.maxima.output_bytes == 1024 * 1024
    assert p.limits.maxima.output_hard_bytes == 64 * 1024 * 1024
    assert p.rate_limits.roles == {
        Role.VIEWER: "120/minute",
        Role.RUNNER: "60/minute",
        Role.ADMIN: "600/minute",
    }
    assert p.shell_denied(":(){ :|:& };:") is not None


def test_public_dict_is_json_and_round_trips() -> None:
    policy = parse_policy(
        "rate_limits: {tokens: {ci: 5/second}}\nquotas: {workspaces: {team-a: {storage_mib: 9}}}\n"
    )
    data = json.loads(json.dumps(policy.to_public_dict()))
    assert data["rate_limits"]["roles"]["runner"] == "60/minute"
    assert data["quotas"]["workspaces"]["team-a"]["storage_mib"] == 9
    assert Policy.model_validate(data) == policy


def test_policy_is_frozen() -> None:
    policy = Policy()
    with pytest.raises(ValidationError):
        policy.limits.maxima.timeout_s = 5  # type: ignore[misc]


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "limits:\n  maxima:\n    memory_mib: lots\n",
            "policies.yaml: limits.maxima.memory_mib: Input should be a valid integer, "
            "unable to parse string as an integer (got 'lots')",
        ),
        ("limits:\n  defaults:\n    timeout_s: soon\n", "limits.defaults.timeout_s: Input should"),
        ("limits:\n  maxima:\n    processes: yes\n", "limits.maxima.processes: Input should be a"),
        ("limits: [1, 2]\n", "policies.yaml: limits: Input should be a valid dictionary"),
        ("shell:\n  deny_patterns: 'rm'\n", "shell.deny_patterns: Input should be a valid list"),
        ("rate_limits:\n  tokens:\n    ci: 5\n", "rate_limits.tokens.ci: Input should be a valid"),
        ("version: 2\n", "policies.yaml: version: Input should be 1 (got 2)"),
    ],
)
def test_wrong_type_is_refused_with_path_and_reason(text: str, expected: str) -> None:
    assert expected in refused(text)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("colour: red\n", "colour"),
        ("limits:\n  netwrok: false\n", "limits.netwrok"),
        ("quotas:\n  default:\n    runs_per_dya: 5\n", "quotas.default.runs_per_dya"),
        ("quotas:\n  workspaces:\n    team-a:\n      cpu: 5\n", "quotas.workspaces.team-a.cpu"),
        ("rate_limits:\n  per_ip: 5/second\n", "rate_limits.per_ip"),
    ],
)
def test_unknown_keys_are_refused_at_any_depth(text: str, path: str) -> None:
    assert f"policies.yaml: {path}: unknown field" in refused(text)


def test_unknown_key_suggests_the_close_field() -> None:
    message = refused("quotas:\n  default:\n    runs_per_dya: 5\n")
    assert message == (
        "policies.yaml: quotas.default.runs_per_dya: unknown field (did you mean 'runs_per_day'?)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "limits:\n  defaults:\n    timeout_s: 90\n",
            "policies.yaml: limits.defaults.timeout_s: 90 is above limits.maxima.timeout_s (60)",
        ),
        (
            "limits:\n  defaults: {memory_mib: 512}\n  maxima: {memory_mib: 256}\n",
            "limits.defaults.memory_mib: 512 is above limits.maxima.memory_mib (256)",
        ),
        (
            "limits:\n  maxima:\n    output_bytes: 2000\n    output_hard_bytes: 1000\n",
            "limits.maxima.output_bytes: 2000 is above limits.maxima.output_hard_bytes (1000)",
        ),
        (
            "limits:\n  maxima:\n    timeout_s: 100000\n",
            "limits.maxima.timeout_s: Input should be less than or equal to 86400 (got 100000)",
        ),
        (
            "limits:\n  maxima:\n    memory_mib: 99999999\n",
            "limits.maxima.memory_mib: Input should be less than or equal to 1048576",
        ),
        (
            "limits:\n  maxima:\n    processes: 1000000\n",
            "limits.maxima.processes: Input should be less than or equal to 65536",
        ),
        (
            "limits:\n  defaults:\n    memory_mib: 8\n",
            "limits.defaults.memory_mib: Input should be greater than or equal to 16 (got 8)",
        ),
        (
            "limits:\n  maxima:\n    timeout_s: .inf\n",
            "limits.maxima.timeout_s: Input should be a finite number",
        ),
        (
            "quotas:\n  default:\n    storage_mib: -1\n",
            "quotas.default.storage_mib: Input should be greater than or equal to 0 (got -1)",
        ),
    ],
)
def test_limits_out_of_range_are_refused(text: str, expected: str) -> None:
    assert expected in refused(text)


@pytest.mark.parametrize("value", ["true", "on", "yes", "1", "'off'"])
def test_network_cannot_be_turned_on(value: str) -> None:
    message = refused(f"limits:\n  network: {value}\n")
    assert message.startswith(
        "policies.yaml: limits.network: network access is not supported by this Nox"
    )


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("rate_limits:\n  roles:\n    runner: 60/fortnight\n", "rate_limits.roles.runner"),
        ("rate_limits:\n  tokens:\n    ci-bot: 60/fortnight\n", "rate_limits.tokens.ci-bot"),
        ("rate_limits:\n  auth_failures_per_client: 60/fortnight\n", "auth_failures_per_client"),
    ],
)
def test_bad_rate_string_is_refused(text: str, path: str) -> None:
    message = refused(text)
    assert f"{path}: not a rate limit like '60/minute'" in message
    assert "no granularity matched for fortnight (got '60/fortnight')" in message


def test_unknown_role_is_refused() -> None:
    message = refused("rate_limits:\n  roles:\n    root: 1/second\n")
    assert "rate_limits.roles.root: invalid key: Input should be 'viewer', 'runner' or 'admin'" in (
        message
    )


def test_bad_regex_is_refused_naming_its_index() -> None:
    message = refused("shell:\n  deny_patterns:\n    - 'ok'\n    - 'foo('\n")
    assert message == (
        "policies.yaml: shell.deny_patterns[1]: not a valid regular expression: "
        "missing ), unterminated subpattern at position 3 (got 'foo(')"
    )


@pytest.mark.parametrize("name", ["Team-A", "-team", "team a", "x" * 64, "team.a"])
def test_bad_workspace_name_is_refused(name: str) -> None:
    message = refused(json.dumps({"quotas": {"workspaces": {name: {"runs_per_day": 1}}}}))
    assert "policies.yaml: quotas.workspaces" in message
    assert "invalid key: a workspace name is 1-63 characters of a-z, 0-9, '_' and '-'" in message
    assert f"(got '{name[:20]}" in message


def test_bad_yaml_is_refused_with_its_line() -> None:
    text = "version: 1\n\nlimits:\n  defaults:\n    timeout_s: 5\n  maxima:\n    cpu_s: 60: 70\n"
    message = refused(text)
    assert message == (
        "policies.yaml: line 7: YAML syntax error: mapping values are not allowed here (column 14)"
    )


def test_duplicate_key_is_refused_with_its_line() -> None:
    message = refused("rate_limits:\n  roles:\n    runner: 5/second\n    runner: 500/second\n")
    assert message == (
        "policies.yaml: line 4: YAML syntax error: key 'runner' is given twice (column 5)"
    )


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just words\n", "str")])
def test_non_mapping_is_refused(text: str, kind: str) -> None:
    assert refused(text) == (
        "policies.yaml: the policy must be a mapping of sections "
        f"(limits, rate_limits, quotas, shell), not a {kind}"
    )


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"^policies\.yaml: policy file not found \(.*\)$"):
        load_policy(tmp_path / "policies.yaml")


def test_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "policies.yaml").mkdir()
    with pytest.raises(PolicyError, match=r"^policies\.yaml: not a regular file"):
        load_policy(tmp_path / "policies.yaml")


def test_large_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text("#" * MAX_POLICY_BYTES + "\n")
    with pytest.raises(PolicyError, match=r"^policies\.yaml: the file is larger than 1048576"):
        load_policy(path)
    with pytest.raises(PolicyError, match="larger than"):
        parse_policy(path.read_text())


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(PolicyError, match=r"^policies\.yaml: not UTF-8 text \(byte 16\)$"):
        load_policy(path)


def test_all_problems_are_reported_first_first_one_a_line() -> None:
    text = (
        "limits:\n  maxima:\n    memory_mib: lots\n    cpu_s: 0\n"
        "rate_limits:\n  roles:\n    runner: 1/fortnight\n"
        "shell:\n  deny_patterns: ['(']\n"
        "bogus: 1\n"
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policies.yaml")
    err = info.value
    lines = err.message.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "limits.maxima.cpu_s",
        "limits.maxima.memory_mib",
        "rate_limits.roles.runner",
        "shell.deny_patterns[0]",
        "bogus",
    ]
    assert all(line.startswith("policies.yaml: ") for line in lines)
    assert err.problems == tuple(lines)
    assert isinstance(err, InvalidRequest)
    assert (err.status, err.code) == (400, "invalid_request")


def test_many_problems_are_cut_short() -> None:
    text = "\n".join(f"unknown_{i}: 1" for i in range(30))
    lines = refused(text).splitlines()
    assert len(lines) == 21
    assert lines[-1] == "... and 10 more problems"


def test_source_names_the_text() -> None:
    with pytest.raises(PolicyError, match=r"^policy: colour: unknown field$"):
        parse_policy("colour: red\n")


# --- merging and helpers ------------------------------------------------------------------------


def test_roles_left_out_keep_their_default() -> None:
    policy = parse_policy("rate_limits:\n  roles:\n    runner: 5/second\n")
    assert policy.rate_limits.roles == {
        Role.VIEWER: "120/minute",
        Role.RUNNER: "5/second",
        Role.ADMIN: "600/minute",
    }


def test_quota_for_merges_the_override() -> None:
    policy = parse_policy(
        "quotas:\n  default:\n    runs_per_day: 100\n"
        "  workspaces:\n    team-a:\n      storage_mib: 0\n      runs_per_day: null\n"
        "    team-b:\n"
    )
    assert policy.quota_for("team-a") == WorkspaceQuota(
        runs_per_day=100, cpu_seconds_per_day=36000, storage_mib=0, upload_mib_per_day=1024
    )
    assert policy.quota_for("team-b") == policy.quotas.default
    assert policy.quota_for("elsewhere") == WorkspaceQuota(runs_per_day=100)


def test_rate_for_prefers_token_id_then_name_then_role() -> None:
    policy = parse_policy(
        "rate_limits:\n  tokens:\n    a1b2: 1/second\n    ci-bot: 2/second\n"
        "  roles:\n    admin: 3/second\n"
    )
    assert policy.rate_for(Role.RUNNER, "a1b2", "ci-bot") == "1/second"
    assert policy.rate_for(Role.RUNNER, "ffff", "ci-bot") == "2/second"
    assert policy.rate_for(Role.ADMIN, "ffff", "other") == "3/second"
    assert policy.rate_for(Role.VIEWER, "ffff", "other") == "120/minute"


@pytest.mark.parametrize(
    ("cmd", "denied"),
    [
        (":(){ :|:& };:", True),
        ("mkfs.ext4 /dev/sda1", True),
        ("dd if=/dev/zero of=/dev/sda bs=1M", True),
        ("rm -rf /", True),
        ("rm -rf --no-preserve-root /", True),
        ("echo hello; ls -la /", False),
        ("rm -rf ./build /tmp/x", False),
        ("dd if=/dev/zero of=out.bin count=1", False),
        ("python3 -c 'print(1)'", False),
    ],
)
def test_shell_denied_by_default_patterns(cmd: str, denied: bool) -> None:
    assert (Policy().shell_denied(cmd) is not None) is denied


def test_shell_denied_returns_the_first_matching_pattern() -> None:
    policy = parse_policy(r"shell: {deny_patterns: ['\bcurl\b', 'wget', 'c.rl']}")
    assert policy.shell_denied("curl http://x | sh") == r"\bcurl\b"
    assert policy.shell_denied("wget x && curl y") == r"\bcurl\b"
    assert policy.shell_denied("wget x") == "wget"
    assert policy.shell_denied("echo ok") is None
    assert parse_policy("shell: {deny_patterns: []}").shell_denied(":(){ :|:& };:") is None


# --- the store --------------------------------------------------------------------------------


def test_store_loads_and_reports_its_source(policy_file: Path) -> None:
    policy_file.write_text("version: 1\n")
    s = PolicyStore(policy_file)
    assert s.current == Policy()
    assert s.path == policy_file
    assert s.loaded_at.utcoffset() == timedelta(0)
    assert s.source_sha256 == hashlib.sha256(b"version: 1\n").hexdigest()


def test_store_refuses_a_bad_first_file(policy_file: Path) -> None:
    policy_file.write_text("limits: {network: true}\n")
    with pytest.raises(PolicyError, match=r"limits\.network"):
        PolicyStore(policy_file)


def test_bad_reload_keeps_the_old_policy_and_a_good_one_is_taken(
    store: PolicyStore, policy_file: Path
) -> None:
    old, old_sha, old_at = store.current, store.source_sha256, store.loaded_at
    policy_file.write_text("limits:\n  maxima:\n    memory_mib: lots\n")
    with pytest.raises(PolicyError, match=r"limits\.maxima\.memory_mib"):
        store.reload()
    assert store.current is old
    assert (store.source_sha256, store.loaded_at) == (old_sha, old_at)

    policy_file.unlink()
    with pytest.raises(PolicyError, match="not found"):
        store.reload()
    assert store.current is old

    policy_file.write_text("limits:\n  maxima:\n    memory_mib: 2048\n")
    new = store.reload()
    assert new is store.current
    assert new.limits.maxima.memory_mib == 2048
    assert store.source_sha256 != old_sha
    assert store.loaded_at >= old_at


def test_listeners_are_called_once_per_change(store: PolicyStore, policy_file: Path) -> None:
    calls: list[tuple[Policy, Policy]] = []
    remove = store.on_change(lambda old, new: calls.append((old, new)))
    first = store.current

    policy_file.write_text("quotas: {default: {runs_per_day: 5}}\n")
    second = store.reload()
    assert calls == [(first, second)]

    store.reload()  # the same file
    policy_file.write_text("# a comment only\nquotas: {default: {runs_per_day: 5}}\n")
    assert store.reload() is second  # same policy, other text
    assert len(calls) == 1

    policy_file.write_text("{bad")
    with pytest.raises(PolicyError):
        store.reload()
    assert len(calls) == 1

    remove()
    policy_file.write_text("")
    store.reload()
    assert len(calls) == 1


def test_a_failing_listener_does_not_stop_the_reload(
    store: PolicyStore, policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Policy] = []

    def broken(_old: Policy, _new: Policy) -> None:
        raise RuntimeError("boom")

    store.on_change(broken)
    store.on_change(lambda _old, new: seen.append(new))
    policy_file.write_text("quotas: {default: {runs_per_day: 5}}\n")
    with caplog.at_level(logging.ERROR, logger="nox.policy"):
        new = store.reload()
    assert seen == [new]
    assert store.current is new
    assert "listener failed" in caplog.text


def test_watcher_takes_a_change_and_ignores_a_bad_one(
    store: PolicyStore, policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store.start_watching(interval_s=0.05)
    store.start_watching(interval_s=0.05)  # a second start does nothing
    policy_file.write_text("quotas: {default: {runs_per_day: 7}}\n")
    assert wait_for(lambda: store.current.quotas.default.runs_per_day == 7)
    good = store.current

    with caplog.at_level(logging.WARNING, logger="nox.policy"):
        policy_file.write_text("quotas: {default: {runs_per_dya: 80}}\n")
        assert wait_for(lambda: "runs_per_dya" in caplog.text)
        time.sleep(0.4)  # several more polls of the same bad file
    refusals = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refusals) == 1
    assert "quotas.default.runs_per_dya: unknown field" in refusals[0].getMessage()
    assert store.current is good

    # an editor's atomic replace: a new inode
    tmp = policy_file.with_suffix(".tmp")
    tmp.write_text("quotas: {default: {runs_per_day: 9}}\n")
    tmp.replace(policy_file)
    assert wait_for(lambda: store.current.quotas.default.runs_per_day == 9)

    store.stop_watching()
    store.stop_watching()
    policy_file.write_text("quotas: {default: {runs_per_day: 10}}\n")
    time.sleep(0.3)
    assert store.current.quotas.default.runs_per_day == 9


def test_watcher_interval_must_be_positive(store: PolicyStore) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        store.start_watching(interval_s=0)


def test_sighup_reloads(
    store: PolicyStore, policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, lambda _signum, _frame: None)  # never the default: exit
        assert install_sighup(store) is True
        policy_file.write_text("quotas: {default: {runs_per_day: 11}}\n")
        with caplog.at_level(logging.INFO, logger="nox.policy"):
            os.kill(os.getpid(), signal.SIGHUP)
            assert wait_for(lambda: store.current.quotas.default.runs_per_day == 11)
            assert wait_for(lambda: "reloaded on SIGHUP" in caplog.text)

            policy_file.write_text("limits: {network: true}\n")
            os.kill(os.getpid(), signal.SIGHUP)
            assert wait_for(lambda: "refused" in caplog.text)
        assert store.current.quotas.default.runs_per_day == 11
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_sighup_needs_the_main_thread(store: PolicyStore) -> None:
    previous = signal.getsignal(signal.SIGHUP)
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(install_sighup(store)))
    thread.start()
    thread.join()
    assert results == [False]
    assert signal.getsignal(signal.SIGHUP) is previous


def test_watcher_waits_out_a_truncated_file(store: PolicyStore, policy_file: Path) -> None:
    """A writer that truncates the file and is slow to write must not make the watcher load
    an empty file (all defaults) in between."""
    store.start_watching(interval_s=0.02)
    policy_file.write_text("quotas: {default: {runs_per_day: 7}}\n")
    assert wait_for(lambda: store.current.quotas.default.runs_per_day == 7)
    good = store.current
    with policy_file.open("w") as f:  # truncated now
        time.sleep(0.4)  # many polls and settles see the empty file
        assert store.current is good
        f.write("quotas: {default: {runs_per_day: 8}}\n")
    assert wait_for(lambda: store.current.quotas.default.runs_per_day == 8)
