"""`main.py --version` and `--self-test`: what an upgrade checks on a new copy of the agent
before swapping it in."""

import os
import re
import subprocess
import sys

from tests.conftest import AGENT


def run_agent(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(AGENT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env or dict(os.environ),
    )


def test_version_prints_the_declared_version() -> None:
    declared = re.search(r'^__version__ = "([^"]+)"$', AGENT.read_text(), re.M).group(1)
    done = run_agent("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == declared


def test_self_test_passes_where_the_agent_can_run() -> None:
    done = run_agent("--self-test")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("self-test ok")


def test_self_test_fails_where_commands_cannot_run() -> None:
    done = run_agent("--self-test", env={**os.environ, "PATH": "/nonexistent"})
    assert done.returncode == 1
    assert "self-test failed" in done.stderr
