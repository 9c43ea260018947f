"""The container tests build the image of the top-level Dockerfile once per session (the base
image comes from debootstrap, cached; the build from podman's layer cache), and run it with podman
and podman-compose. Those need root (debootstrap, and podman without a rootless set-up):
elsewhere they are skipped, saying so; the checks of the files themselves run anywhere."""

from __future__ import annotations

import os

import pytest
from tests.container._podman import IMAGE, build_image, podman_env, tool


@pytest.fixture(scope="session")
def podman_environ(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if os.geteuid() != 0:
        pytest.skip(
            "container tests need root (debootstrap, rootful podman): run "
            "`sudo .venv/bin/python -m pytest -m container tests/container`"
        )
    for name in ("podman", "debootstrap", "runc", "podman-compose"):
        tool(name)
    return podman_env(tmp_path_factory.mktemp("podman"))


_TIMES: dict[str, float] = {}


@pytest.fixture(scope="session")
def image(podman_environ: dict[str, str]) -> str:
    """Builds the image (tag ``nox-api:test``); the summary says how long that took."""
    _TIMES.update(build_image(podman_environ))
    return IMAGE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _TIMES:
        terminalreporter.write_line(
            f"container image: base {_TIMES['base']:.1f} s, podman build {_TIMES['build']:.1f} s"
        )
