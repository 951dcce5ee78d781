"""End-to-end fixtures for tetherctl: the installed `tetherctl` command run as a subprocess,
as an operator with a fresh account (so `all` and tags see only this test's agents), a home
directory of its own and `TETHER_URL`/`TETHER_TOKEN` in its environment; and agents that
report a hostname chosen by the test (every agent here runs on one machine)."""

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AGENT, AgentProcess, Api, Fleet, TetherServer, free_port, wait_for

TETHERCTL = Path(sys.executable).parent / "tetherctl"
PASSWORD = "operator-pw-for-tests"

LAUNCHER = """\
import os, runpy, socket
# The test's host name for this agent, in what it reports and in its commands' environment.
socket.gethostname = lambda: {hostname!r}
os.environ["TEST_HOSTNAME"] = {hostname!r}
runpy.run_path({agent!r}, run_name="__main__")
"""


def tetherctl(
    *args: str, env: dict[str, str], input: str | None = None, timeout: float = 90
) -> subprocess.CompletedProcess:
    """Run the installed command; no controlling terminal, so a password prompt reads stdin."""
    return subprocess.run(
        [str(TETHERCTL), *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment tetherctl runs in: its own home and config dir, no stray login."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        NO_COLOR="1",
        COLUMNS="200",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def named_agent(directory: Path, hostname: str) -> Path:
    """A launcher that runs a copy of the agent (an upgrade writes beside its file, never
    into the repository) under `hostname`."""
    directory.mkdir(parents=True, exist_ok=True)
    copy = directory / "main.py"
    shutil.copy(AGENT, copy)
    launcher = directory / "launch.py"
    launcher.write_text(LAUNCHER.format(hostname=hostname, agent=str(copy)))
    return launcher


class Operator:
    """A user of their own, with the servers and agents a test gives them."""

    def __init__(self, tether: TetherServer, tmp: Path) -> None:
        self.tether = tether
        self.tmp = tmp
        self.username = f"op-{uuid.uuid4().hex[:8]}"
        self.api: Api = tether.create_user(self.username, PASSWORD)
        self.token = self.api.headers["Authorization"].split()[1]
        self.home = tmp / "home"
        self.home.mkdir(parents=True)
        self.env = clean_env(self.home, TETHER_URL=tether.url, TETHER_TOKEN=self.token)
        self.fleets: list[Fleet] = []

    def ctl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return tetherctl(*args, env=kw.pop("env", self.env), **kw)

    def hosts(self, *hostnames: str, tags: tuple[str, ...] = (), rpc: bool = False) -> list[Fleet]:
        """One managed host (server and running agent) per hostname, all online and tagged."""
        started = []
        for hostname in hostnames:
            fleet = Fleet(self.tether, self.api, self.tmp)
            state = self.tmp / f"agent-{uuid.uuid4().hex[:8]}"
            state.mkdir()
            fleet.rpc_port = free_port() if rpc else 0
            extra = ("--rpc-port", str(fleet.rpc_port)) if rpc else ()
            launcher = named_agent(state / "install", hostname)
            fleet.agent_proc = AgentProcess(
                self.tether, fleet.server_token, state, agent_file=launcher, extra=extra
            ).start()
            started.append(fleet)
            self.fleets.append(fleet)
        for fleet in started:
            fleet.agent_id = fleet.wait_online()["id"]
            if tags:
                self.tag(fleet.agent_id, *tags)
            if rpc:
                wait_for(lambda f=fleet: self.certificate_installed(f), what="RPC certificate")
        return started

    def tag(self, agent_id: int, *tags: str) -> None:
        status, body = self.api.request("PATCH", f"/api/agents/{agent_id}/", {"tags": list(tags)})
        assert status == 200, body

    def certificate_installed(self, fleet: Fleet) -> bool:
        status, body = self.api.post(f"/api/agents/{fleet.agent_id}/update_certificate/", {})
        assert status == 200, body
        return bool(body["serial"]) and not body["pending"]

    def agent(self, agent_id: int) -> dict:
        status, body = self.api.get(f"/api/agents/{agent_id}/")
        assert status == 200, body
        return body

    def stop_agent(self, fleet: Fleet) -> None:
        """Stop the agent's process and wait until the server marks it offline."""
        fleet.agent_proc.kill(signal.SIGTERM)
        wait_for(
            lambda: self.agent(fleet.agent_id)["status"] == "offline",
            timeout=30,
            what="agent offline",
        )

    def close(self) -> None:
        for fleet in self.fleets:
            proc = fleet.agent_proc.proc if fleet.agent_proc else None
            if proc is not None and proc.poll() is None:
                fleet.agent_proc.kill(signal.SIGTERM)


@pytest.fixture
def operator(tether: TetherServer, tmp_path: Path) -> Iterator[Operator]:
    op = Operator(tether, tmp_path)
    yield op
    op.close()


def unique(name: str) -> str:
    """A hostname no other test's agent has (the server is shared by the session)."""
    return f"{name}-{uuid.uuid4().hex[:6]}"
