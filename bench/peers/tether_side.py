"""Tether: a real `tether serve` (SQLite, production timers) and real agent processes
(`agent/main.py`) on loopback, started as `bench/fanout.py` starts them. A round is one run
of `true` to N agents, measured two ways:

- `Tether`: tetherctl's own code in this process (`tether_cli.runs.start_run`, then
  `runs.follow` reading `GET /api/runs/{id}/stream/` until its `end` event), from the
  POST sent to `end` received;
- `tetherctl run`: the command an operator types, `tetherctl run ID... -- true`, as a
  process, interpreter start-up included, until it exits 0.
"""

import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from bench.dispatch import PRODUCTION_TIMERS
from bench.fanout import start_real_agents
from bench.peers.common import Series, elapsed_ms, stop_groups, timed_process
from tests.conftest import ADMIN_PASSWORD, BIN, AgentProcess, TetherServer
from tether_cli import runs
from tether_cli.client import Client
from tether_cli.config import Login


def run_through_api(client: Client, agents: list[int]) -> None:
    body: dict[str, Any] = {"command": "true", "targets": {"agents": agents}, "timeout": 60}
    started = runs.start_run(client, body)
    end = runs.follow(client, started["id"], lambda event: None)
    succeeded = end["counts"].get("succeeded")
    if end["status"] != "succeeded" or succeeded != len(agents):
        raise RuntimeError(f"run {started['id']} ended {end}")


def measure(sizes: list[int], rounds: int, warmup: int, tmp: Path) -> list[Series]:
    api_series, cli_series = Series("Tether"), Series("tetherctl run")
    env = {**PRODUCTION_TIMERS, "TETHER_REGISTER_RATE": "1000000/min"}
    server = TetherServer(tmp / "tether", env)
    agents: list[AgentProcess] = []
    try:
        server.setup().start()
        api = server.login("admin", ADMIN_PASSWORD)
        ids, agents = start_real_agents(server, api, tmp, max(sizes))
        token = api.headers["Authorization"].split()[1]
        client = Client(Login(server.url, token))
        config_home = Path(tempfile.mkdtemp(prefix="tetherctl-", dir=tmp))
        cli_env = {
            **os.environ,
            "TETHER_URL": server.url,
            "TETHER_TOKEN": token,
            "XDG_CONFIG_HOME": str(config_home),
        }
        for size in sizes:
            targets = ids[:size]
            argv = [str(BIN / "tetherctl"), "run", *map(str, targets), "--", "true"]
            for _ in range(warmup):
                run_through_api(client, targets)
                timed_process(argv, env=cli_env, cwd=tmp)
            api_series.rounds[size], cli_series.rounds[size] = [], []
            through_api = partial(run_through_api, client, targets)
            for _ in range(rounds):  # alternated, so that both see the same machine
                api_series.rounds[size].append(elapsed_ms(through_api))
                cli_series.rounds[size].append(timed_process(argv, env=cli_env, cwd=tmp)[0])
    finally:
        # The server first: an agent stops only once its held long-poll ends.
        if server.proc is not None:
            server.kill()
        stop_groups([agent.proc for agent in agents if agent.proc is not None])
    return [api_series, cli_series]
