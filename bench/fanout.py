#!/usr/bin/env python3
"""Fan-out: one run of `true` to N agents, from the POST /api/runs/ to the last result stored.

Starts a real `tether serve` (SQLite, or PostgreSQL with TETHER_DATABASE_URL; production
timers) and measures, over several rounds:
  single     one `send_command` to one real agent, until its result is stored (for scale)
  real N     a run to N real agent processes (agent/main.py, one managed server each)
  sim N      a run to N simulated agents: asyncio, standard library only, many per process,
             speaking the agent's HTTP protocol on keep-alive connections (below)
Each figure runs from the moment the bench sends its POST (client clock) to the last target's
`finished_at`, written by the server when it stores the result (same host, same clock). The
bench learns that a run is over by reading the database itself, as bench/dispatch.py does,
so the server carries no extra load while it works. Beside the total it prints when, from the
POST, the last target reached each phase: run row created, POST answered, handed to its agent
(`delivered_at`), started by its agent (`started_at`, agent clock), result stored, run over.

The simulated agents (bench/sim.py) register signing (hmac-sha256, as agent/main.py does),
hold one long-poll each (`GET /api/agents/poll_commands/?wait=25`) and, for a command, post
one result at once, as agent/main.py does for a command that ends within its ACK_DELAY
(50 ms, so `true`): no acknowledging progress call, the result alone, with sizes.

Run from the repository root: `make bench` or `.venv/bin/python bench/fanout.py`.
"""

import argparse
import contextlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dispatch import PRODUCTION_TIMERS  # noqa: E402
from bench.sim import SimulatorProcess  # noqa: E402
from tests.conftest import (  # noqa: E402
    ADMIN_PASSWORD,
    AGENT,
    AgentProcess,
    Api,
    Fleet,
    TetherServer,
    database_label,
    wait_for,
)

# ---------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------


def stamp(value: str | datetime | None) -> float:
    """A datetime as read from the database (SQLite: text in UTC, no zone; PostgreSQL: an aware
    datetime) as a Unix time."""
    assert value is not None
    if isinstance(value, str):
        value = datetime.fromisoformat(value).replace(tzinfo=UTC)
    return value.timestamp()


@dataclass
class Round:
    total: float  # POST sent -> last result stored, ms
    phases: dict[str, float] = field(default_factory=dict)  # when the last target got there
    server_cpu: float = 0.0  # ms of CPU the server process used from the POST to the end


def cpu_ms(pid: int) -> float:
    """User and system CPU time of a process so far (/proc/PID/stat), in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


PHASES = ("created", "answered", "delivered", "started", "stored", "run over")


def wait_over(server: TetherServer, table: str, row_id: int, timeout: float = 120) -> None:
    """Until the row is final, reading the database directly (no load on the server)."""
    query = f"SELECT finished_at FROM {table} WHERE id = ?"
    deadline = time.monotonic() + timeout
    with server.db() as conn:
        while time.monotonic() < deadline:
            row = conn.execute(query, (row_id,)).fetchone()
            if row and row[0]:
                return
            time.sleep(0.002)
    raise RuntimeError(f"{table} {row_id} not over in {timeout} s")


def fan_out(server: TetherServer, api: Api, targets: dict[str, Any]) -> Round:
    cpu_before = cpu_ms(server.proc.pid)
    began = time.time()
    status, run = api.post("/api/runs/", {"command": "true", "targets": targets, "timeout": 60})
    answered = time.time()
    assert status == 201, run
    wait_over(server, "commands_run", run["id"])
    cpu = cpu_ms(server.proc.pid) - cpu_before
    (created, over, state), *_ = server.sql(
        "SELECT created_at, finished_at, status FROM commands_run WHERE id = ?", run["id"]
    )
    rows = server.sql(
        "SELECT delivered_at, started_at, finished_at, status FROM commands_command "
        "WHERE run_id = ?",
        run["id"],
    )
    assert state == "succeeded" and len(rows) == run["counts"]["total"], (state, rows[:3])
    last = [max(stamp(row[i]) for row in rows) for i in range(3)]
    moments = [stamp(created), answered, *last, stamp(over)]
    return Round(
        total=(last[2] - began) * 1000,
        phases={name: (at - began) * 1000 for name, at in zip(PHASES, moments, strict=True)},
        server_cpu=cpu,
    )


def single(server: TetherServer, api: Api, agent_id: int) -> float:
    began = time.time()
    status, command = api.post(f"/api/agents/{agent_id}/send_command/", {"command": "true"})
    assert status == 201, command
    wait_over(server, "commands_command", command["id"])
    ((finished, state),) = server.sql(
        "SELECT finished_at, status FROM commands_command WHERE id = ?", command["id"]
    )
    assert state == "succeeded", state
    return (stamp(finished) - began) * 1000


def rpc_off() -> tuple[str, ...]:
    """`--no-rpc` where the agent has the flag; without it an agent serves no RPC anyway."""
    usage = subprocess.run(
        [sys.executable, str(AGENT), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    return ("--no-rpc",) if "--no-rpc" in usage else ()


def online(server: TetherServer, server_ids: list[int]) -> list[int]:
    marks = ",".join("?" * len(server_ids))
    rows = server.sql(
        f"SELECT id FROM fleet_agent WHERE server_id IN ({marks}) AND status = 'online' "
        "ORDER BY id",
        *server_ids,
    )
    return [agent_id for (agent_id,) in rows]


def start_real_agents(server: TetherServer, api: Api, tmp: Path, count: int) -> tuple[list, list]:
    """`count` agent processes at once, one managed server each; their ids once all online."""
    fleets = [Fleet(server, api, tmp) for _ in range(count)]
    extra = rpc_off()
    processes = [
        AgentProcess(
            server, f.server_token, Path(tempfile.mkdtemp(prefix="agent-", dir=tmp)), extra=extra
        ).start()
        for f in fleets
    ]
    ids = [f.server_id for f in fleets]
    agents = wait_for(lambda: len(found := online(server, ids)) == count and found, timeout=60)
    return agents, processes


def start_simulated(
    server: TetherServer, api: Api, tmp: Path, count: int, processes: int
) -> tuple[int, list[SimulatorProcess]]:
    """`count` simulated agents on one managed server, split over `processes` processes."""
    fleet = Fleet(server, api, tmp)
    children = []
    for n in range(processes):
        share = count // processes + (n < count % processes)
        log = tmp / f"sim{n}.log"
        children.append(SimulatorProcess(server.url, fleet.server_token, share, f"sim{n}", log=log))
    for child in children:
        child.registered()
    for child in children:
        child.live()
    wait_for(
        lambda: len(online(server, [fleet.server_id])) == count,
        timeout=120,
        interval=0.5,
        what=f"{count} simulated agents online",
    )
    return fleet.server_id, children


@contextlib.contextmanager
def profiled(server: TetherServer, directory: Path | None, name: str) -> Iterator[None]:
    """py-spy on the server while the rounds run: the thread holding the GIL, so the samples
    say where the server's Python time goes."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    argv = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(server.proc.pid)]
    argv += ["-r", "500", "--gil", "-f", "raw", "-o", str(directory / f"{name}.txt")]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # attached
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def idle_load(server: TetherServer, seconds: float = 5) -> float:
    """The server's CPU, in % of one core, while nothing is sent (the agents' polls held)."""
    before = cpu_ms(server.proc.pid)
    time.sleep(seconds)
    return (cpu_ms(server.proc.pid) - before) / (seconds * 10)


def p50(values: list[float]) -> float:
    return statistics.median(values)


def report(label: str, rounds: list[Round], single_ms: float) -> None:
    totals = [r.total for r in rounds]
    print(
        f"  {label:14s} p50 {p50(totals):7.1f} ms   min {min(totals):7.1f}   "
        f"max {max(totals):7.1f}   ({p50(totals) / single_ms:4.1f}x single, {len(rounds)} rounds)"
    )
    phases = "  ".join(f"{name} {p50([r.phases[name] for r in rounds]):.1f}" for name in PHASES)
    print(f"  {'':14s} last target, ms from the POST (p50): {phases}")
    cpu = p50([r.server_cpu for r in rounds])
    size = int(label.split()[-1])
    print(f"  {'':14s} server CPU {cpu:.0f} ms per run, {cpu / size:.2f} ms per target (p50)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--real", default="10,25", help="sizes of runs to real agents")
    parser.add_argument("--simulated", type=int, default=1000)
    parser.add_argument("--sim-processes", type=int, default=1)
    parser.add_argument("--single", type=int, default=30, help="single dispatches to time")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the server on top of the production timers (diagnosis)",
    )
    parser.add_argument(
        "--profile", type=Path, help="record the server with py-spy into this directory"
    )
    args = parser.parse_args()

    sizes = [int(n) for n in args.real.split(",") if n]
    # Each simulated agent holds a socket in its process and one in the server's.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.simulated)), hard))
    tmp = Path(tempfile.mkdtemp(prefix="tether-fanout-"))
    env = {**PRODUCTION_TIMERS, "TETHER_REGISTER_RATE": "1000000/min"}
    env.update(item.split("=", 1) for item in args.server_env)
    server = TetherServer(tmp / "data", env).setup().start()
    agents: list[AgentProcess] = []
    children: list[SimulatorProcess] = []
    results: dict[str, list[Round]] = {}
    idle: dict[str, float] = {}
    try:
        api = server.login("admin", ADMIN_PASSWORD)
        ids, agents = start_real_agents(server, api, tmp, max(sizes, default=1))
        idle[f"{len(ids)} real agents"] = idle_load(server)
        for _ in range(5):
            single(server, api, ids[0])
        single_ms = p50([single(server, api, ids[n % len(ids)]) for n in range(args.single)])
        for size in sizes:
            targets = {"agents": ids[:size]}
            for _ in range(args.warmup):
                fan_out(server, api, targets)
            with profiled(server, args.profile, f"real-{size}"):
                rounds = [fan_out(server, api, targets) for _ in range(args.rounds)]
            results[f"real {size}"] = rounds
        for agent in agents:
            agent.kill(signal.SIGTERM)
        agents = []
        if args.simulated:
            sim_server, children = start_simulated(
                server, api, tmp, args.simulated, args.sim_processes
            )
            targets = {"servers": [sim_server]}
            idle[f"{args.simulated} simulated agents"] = idle_load(server)
            for _ in range(args.warmup):
                fan_out(server, api, targets)
            with profiled(server, args.profile, f"sim-{args.simulated}"):
                rounds = [fan_out(server, api, targets) for _ in range(args.rounds)]
            results[f"sim {args.simulated}"] = rounds
    finally:
        for agent in agents:
            if agent.proc and agent.proc.poll() is None:
                agent.kill()
        for child in children:
            child.stop()
        server.kill()

    print(
        f"fan-out of `true`: POST /api/runs/ -> last result stored, {database_label()}, "
        f"production timers, {args.rounds} rounds after {args.warmup} warm-up"
    )
    if args.server_env:
        print(f"  server settings changed: {' '.join(args.server_env)}")
    label = f"send_command to one real agent, {args.single} times"
    print(f"  {'single':14s} p50 {single_ms:7.1f} ms   ({label})")
    for label, rounds in results.items():
        report(label, rounds, single_ms)
    for label, load in idle.items():
        print(f"  idle, {label} holding their polls: server CPU {load:.0f} % of a core")
    print(f"  load average at the end: {os.getloadavg()[0]:.2f} (2 cores; other work skews it)")


if __name__ == "__main__":
    main()
