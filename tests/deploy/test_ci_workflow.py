"""``.github/workflows/ci.yml`` cannot run here (no GitHub Actions, no actionlint): check that it is
valid YAML of the right shape, that each job has its steps, and that ``.ci/run`` runs the same
checks that can run on this machine."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.deploy._stack import REPO

pytestmark = pytest.mark.deploy

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"


def _workflow() -> dict[Any, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict)
    return data


def _runs(job: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def _uses(job: dict[str, Any]) -> list[str]:
    return [step["uses"] for step in job["steps"] if "uses" in step]


def test_the_workflow_has_its_triggers_and_jobs() -> None:
    data = _workflow()
    triggers = data.get("on", data.get(True))  # YAML 1.1 reads a bare `on` as true
    assert isinstance(triggers, dict)
    assert {"push", "pull_request"} <= set(triggers)
    assert data["permissions"] == {"contents": "read"}
    assert set(data["jobs"]) == {"checks", "wheels", "image"}
    for name, job in data["jobs"].items():
        assert job["runs-on"], name
        assert isinstance(job["timeout-minutes"], int), name
        for step in job["steps"]:
            assert ("run" in step) != ("uses" in step), (name, step)
            if "uses" in step:  # every action pinned to a major version at least
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]


def test_the_checks_job_runs_every_gate() -> None:
    job = _workflow()["jobs"]["checks"]
    runs = _runs(job)
    for command in (
        "ruff check .",
        "ruff format --check .",
        ".venv/bin/mypy",
        "-m pytest",
        "shellcheck deploy/*.sh scripts/*.sh .ci/run",
        "./scripts/audit.sh",
        "NOX_SETUP_FOR=test",
    ):
        assert command in runs, command
    for package in ("bubblewrap", "caddy", "nginx", "shellcheck", "redis-server", "postgresql"):
        assert re.search(rf"apt-get install .*\b{package}\b", runs, re.S), package
    upload = next(
        s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")
    )
    assert "build/sbom.cdx.json" in upload["with"]["path"]
    assert upload["with"]["if-no-files-found"] == "error"
    assert upload["if"] == "always()"


def test_the_build_jobs() -> None:
    jobs = _workflow()["jobs"]
    assert "pip wheel --no-deps --wheel-dir dist ./sdk ." in _runs(jobs["wheels"])
    assert any(u.startswith("actions/upload-artifact") for u in _uses(jobs["wheels"]))
    image = jobs["image"]
    assert any(u.startswith("docker/build-push-action") for u in _uses(image))
    build = next(s for s in image["steps"] if s.get("uses", "").startswith("docker/build-push"))
    assert build["with"]["push"] is False


def test_ci_run_runs_what_can_run_here() -> None:
    script = (REPO / ".ci" / "run").read_text()
    checks = _runs(_workflow()["jobs"]["checks"])
    for command in ("shellcheck deploy/*.sh scripts/*.sh .ci/run", "./scripts/audit.sh"):
        assert command in script, command
        assert command in checks, command
    assert "make test" in script  # ruff, format, mypy and the whole suite (scripts/test.sh)
    test_sh = (REPO / "scripts" / "test.sh").read_text()
    for gate in ('ruff" check', 'ruff" format --check', "mypy", "pytest"):
        assert gate in test_sh, gate
    assert "pip wheel -q --no-deps --wheel-dir build/dist ./sdk ." in script


def test_the_workflow_names_only_files_that_exist() -> None:
    text = WORKFLOW.read_text()
    for path in re.findall(r"(?:\./)?((?:scripts|deploy|\.ci)/[\w./*-]+)", text):
        matches = list(Path(REPO).glob(path))
        assert matches, path
