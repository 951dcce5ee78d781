"""The phases of bench/load.py (its docstring says what each measures). Each adds its rows
to the table; phases 3-5 work on the simulated fleet that `start_held` brings up."""

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.fanout import rpc_off
from bench.measure import (
    CpuMeter,
    Database,
    Table,
    cpu_seconds,
    memory_mib,
    moment,
    ms,
    percentile,
    process_tree,
    threads_and_fds,
)
from bench.sim import (
    LEGACY,
    LONG_POLL,
    OUTPUT_COMMAND,
    SIGNED,
    Connection,
    SimulatorProcess,
    endpoint,
    output_for,
)
from tests.conftest import FINAL, Api, Fleet, TetherServer, wait_for

AGENTS_PER_PROCESS = 2500


@dataclass
class Bench:
    """What every phase works with."""

    server: TetherServer
    db: Database
    api: Api
    tmp: Path
    args: argparse.Namespace
    table: Table

    def server_processes(self) -> list[int]:
        assert self.server.proc is not None
        return process_tree(self.server.proc.pid)


class Watch:
    """CPU over a phase: the server's processes, the bench's clients (its own process, or the
    simulators), and a local PostgreSQL's processes when --database-pid names its postmaster
    (the database works for the server too, but is no child of it)."""

    def __init__(self, bench: Bench, clients: list[int]) -> None:
        self.bench = bench
        self.server = CpuMeter(bench.server_processes())
        self.clients = CpuMeter(clients)
        pid = bench.args.database_pid
        self.database = CpuMeter(process_tree(pid)) if pid else None
        self.figures: list[tuple[str, str]] = []

    def stop(self) -> "Watch":
        pids = self.bench.server_processes()
        processes = f"{len(pids)} process{'es' if len(pids) > 1 else ''}"
        self.figures = [(f"server CPU ({processes})", self.server.summary(pids))]
        if self.database is not None:
            database = process_tree(self.bench.args.database_pid)
            self.figures.append(("PostgreSQL's CPU", self.database.summary(database)))
        self.figures.append(("the bench's clients' CPU", f"{self.clients.percent():.1f} %"))
        return self

    def add_rows(self, phase: str, window: str = "meanwhile", target: str = "") -> None:
        """The figures of `stop`, in % of one core; `target` goes with the server's."""
        for n, (name, value) in enumerate(self.figures):
            self.bench.table.add(phase, f"{name} {window}", value, "" if n else target)


# ---------------------------------------------------------------------------------------------
# 1. API load
# ---------------------------------------------------------------------------------------------


@dataclass
class ApiSamples:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter = field(default_factory=Counter)

    def record(self, kind: str, began: float, status: int, expected: int) -> None:
        if status == expected:
            self.latencies.setdefault(kind, []).append((time.perf_counter() - began) * 1000)
        else:
            self.errors[f"{kind} {status}"] += 1


async def api_client(
    url: str, token: str, agents: list[int], n: int, deadline: float, samples: ApiSamples
) -> None:
    """Send `true` to the next agent, read the command (or the agent's history), again."""
    connection = Connection(*endpoint(url))
    auth = {"Authorization": f"Token {token}", "Accept": "application/json"}
    send_headers = {**auth, "Content-Type": "application/json"}
    body = json.dumps({"command": "true"}).encode()
    turn = 0
    while time.monotonic() < deadline:
        agent = agents[(n + turn) % len(agents)]
        try:
            began = time.perf_counter()
            path = f"/api/agents/{agent}/send_command/"
            status, raw = await connection.request("POST", path, send_headers, body)
            samples.record("send_command", began, status, 201)
            if turn % 2 == 0 and status == 201:
                kind, path = "read a command", f"/api/commands/{json.loads(raw)['id']}/"
            else:
                kind, path = "read history", f"/api/agents/{agent}/commands/"
            began = time.perf_counter()
            status, _ = await connection.request("GET", path, auth)
            samples.record(kind, began, status, 200)
        except OSError as exc:
            samples.errors[type(exc).__name__] += 1
        turn += 1
    connection.close()


def run_clients(bench: Bench, agents: list[int], deadline: float) -> ApiSamples:
    samples = ApiSamples()
    token = bench.api.headers["Authorization"].split()[1]

    async def clients() -> None:
        await asyncio.gather(
            *(
                api_client(bench.server.url, token, agents, n, deadline, samples)
                for n in range(bench.args.api_clients)
            )
        )

    asyncio.run(clients())
    return samples


def api_phase(bench: Bench) -> None:
    fleets = [Fleet(bench.server, bench.api, bench.tmp) for _ in range(3)]
    extra = rpc_off()
    try:
        agents = [fleet.start_agent(extra=extra) for fleet in fleets]
        watch, began = Watch(bench, [os.getpid()]), time.monotonic()
        samples = run_clients(bench, agents, began + bench.args.duration)
        elapsed = time.monotonic() - began
        watch.stop()
        drain_began = time.monotonic()
        marks = ",".join("?" * len(agents))
        unfinished = f"SELECT COUNT(*) FROM commands_command WHERE agent_id IN ({marks}) AND "
        unfinished += f"status NOT IN ({','.join(repr(s) for s in sorted(FINAL))})"
        with contextlib.suppress(AssertionError):
            wait_for(lambda: bench.db.rows(unfinished, *agents)[0][0] == 0, 120, 0.5)
        left, drained = bench.db.rows(unfinished, *agents)[0][0], time.monotonic() - drain_began
    finally:
        for fleet in fleets:
            if fleet.agent_proc and fleet.agent_proc.proc and fleet.agent_proc.proc.poll() is None:
                fleet.agent_proc.kill(signal.SIGTERM)
    add = bench.table.add
    count = sum(len(values) for values in samples.latencies.values())
    label = f"{bench.args.api_clients} clients, 3 agents, {elapsed:.0f} s"
    add("api", f"requests/s ({label})", f"{count / elapsed:.0f}", "≥ 400")
    everything = [v for values in samples.latencies.values() for v in values]
    add("api", "all requests", ms(everything), "p99 ≤ 250 ms")
    for kind in ("send_command", "read a command", "read history"):
        values = samples.latencies.get(kind, [])
        add("api", f"{kind} ({len(values)})", ms(values))
    errors = ", ".join(f"{name}: {n}" for name, n in samples.errors.most_common()) or "none"
    add("api", "errors", f"{sum(samples.errors.values())} ({errors})", "0")
    watch.add_rows("api")
    state = f"{left} left after 120 s" if left else f"all done {drained:.1f} s after"
    add("api", "the agents' queue at the end", state)


# ---------------------------------------------------------------------------------------------
# 2. Held agents
# ---------------------------------------------------------------------------------------------


@dataclass
class Held:
    """The simulated fleet: its processes, and every agent as (id, dialect)."""

    children: list[SimulatorProcess]
    server_ids: list[int]
    agents: list[tuple[int, str]] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        """The children's counters summed; `progress_ms` stays one list per child."""
        total: dict[str, Any] = Counter()
        errors: list[str] = []
        progress_ms: list[list[float]] = []
        for child in self.children:
            stats = child.stats()
            for name, value in stats.items():
                if isinstance(value, int):
                    total[name] += value
            errors += stats["last_errors"]
            progress_ms.append(stats["progress_ms"])
        return {**total, "last_errors": errors[-5:], "progress_ms": progress_ms}

    def pids(self) -> list[int]:
        return [child.proc.pid for child in self.children]

    def pick(self, count: int) -> list[int]:
        """`count` agents spread over the fleet, half of each dialect (as far as there are),
        the dialects taking turns."""
        signed = [i for i, d in self.agents if d == SIGNED]
        legacy = [i for i, d in self.agents if d == LEGACY]
        legacy_count = min(len(legacy), max(count // 2, count - len(signed)))
        signed_count = min(len(signed), count - legacy_count)

        def spread(ids: list[int], n: int) -> list[int]:
            return [ids[k * len(ids) // n] for k in range(n)]

        chosen = spread(signed, signed_count), spread(legacy, legacy_count)
        turns = [i for pair in zip(*chosen, strict=False) for i in pair]
        return turns + chosen[0][legacy_count:] + chosen[1][signed_count:]

    def stop(self) -> None:
        for child in self.children:
            child.stop()


def start_held(bench: Bench) -> Held:
    """Register the fleet (all of it before any agent polls: the polls of those registered
    would slow the registration of the rest), then let every agent poll."""
    args, add = bench.args, bench.table.add
    processes = args.sim_processes or max(1, math.ceil(args.agents / AGENTS_PER_PROCESS))
    fleets = [Fleet(bench.server, bench.api, bench.tmp) for _ in range(processes)]
    held = Held([], [fleet.server_id for fleet in fleets])
    concurrency = max(8, args.register_concurrency // processes)
    for n, fleet in enumerate(fleets):
        share = args.agents // processes + (n < args.agents % processes)
        child = SimulatorProcess(
            bench.server.url,
            fleet.server_token,
            share,
            f"sim{n}",
            signed_share=args.signed_share,
            concurrency=concurrency,
            log=bench.tmp / f"sim{n}.log",
        )
        held.children.append(child)
    watch, began = Watch(bench, held.pids()), time.monotonic()  # they start up first
    for child in held.children:
        held.agents += child.registered()
    registered = time.monotonic() - began
    watch.stop()
    for child in held.children:
        child.live()
    began = time.monotonic()
    marks = ",".join("?" * len(held.server_ids))
    online = f"SELECT COUNT(*) FROM fleet_agent WHERE server_id IN ({marks}) AND status = 'online'"
    wait_for(
        lambda: bench.db.rows(online, *held.server_ids)[0][0] == args.agents,
        timeout=300,
        interval=0.5,
        what=f"{args.agents} simulated agents online",
    )
    polling = time.monotonic() - began
    signed = sum(1 for _, dialect in held.agents if dialect == SIGNED)
    label = f"{args.agents} ({signed} signed, {args.agents - signed} legacy)"
    plural = "es" if processes > 1 else ""
    add("held", "simulated agents", f"{label}, {processes} simulator process{plural}")
    rate = f"{args.agents / registered:.0f}/s"
    add("held", "registration, all of them", f"{registered:.1f} s ({rate})")
    watch.add_rows("held")
    add("held", "then all polling (online)", f"{polling:.1f} s")
    return held


def idle_phase(bench: Bench, held: Held) -> None:
    args, add = bench.args, bench.table.add
    # The first polls ask for random waits below 25 s, so that the fleet's polls come back
    # spread out: the window starts once most have come back once.
    time.sleep(args.settle)
    before = held.stats()
    watch = Watch(bench, held.pids())
    time.sleep(args.duration)  # the measured window: nothing is sent, the polls are held
    watch.stop()
    after = held.stats()
    watch.add_rows("held", f"idle {args.duration:.0f} s", "< 30 %")
    pids = bench.server_processes()
    memory = f"{memory_mib(pids, 'Rss'):.0f} MiB (PSS {memory_mib(pids, 'Pss'):.0f} MiB)"
    add("held", "server RSS (sum)", memory, "< 2 GiB")
    if args.database_pid:
        database = process_tree(args.database_pid)
        add("held", "PostgreSQL's RSS (sum)", f"{memory_mib(database, 'Rss'):.0f} MiB "
            f"(PSS {memory_mib(database, 'Pss'):.0f} MiB)")  # fmt: skip
    threads, fds = threads_and_fds(pids)
    add("held", "server threads, file descriptors", f"{threads}, {fds}")
    polls = (after["polls"] - before["polls"]) / args.duration
    add("held", "polls/s answered", f"{polls:.0f} (one per agent per {LONG_POLL} s: "
        f"{args.agents / LONG_POLL:.0f})")  # fmt: skip
    errors = after["errors"] - before["errors"]
    add("held", "agent-side errors in the window", f"{errors} {after['last_errors'] or ''}")


# ---------------------------------------------------------------------------------------------
# 3-5. Work for the held agents
# ---------------------------------------------------------------------------------------------


def dispatch_phase(bench: Bench, held: Held) -> None:
    """`true` to one held agent at a time; its `started_at` is when its poll answered."""
    received, stored, client = [], [], []
    for agent_id in held.pick(bench.args.dispatches):
        began = time.time()
        path = f"/api/agents/{agent_id}/send_command/"
        status, command = bench.api.post(path, {"command": "true"})
        assert status == 201, command
        bench.db.wait_finished("commands_command", command["id"], timeout=60)
        client.append((time.time() - began) * 1000)
        ((created, started, finished, state),) = bench.db.rows(
            "SELECT created_at, started_at, finished_at, status FROM commands_command WHERE id = ?",
            command["id"],
        )
        assert state == "succeeded", state
        received.append((moment(started) - moment(created)) * 1000)
        stored.append((moment(finished) - moment(created)) * 1000)
    add = bench.table.add
    add("dispatch", f"queue -> agent has it ({len(stored)} agents)", ms(received))
    add("dispatch", "queue -> result stored", ms(stored), "p50 ≤ 20, p99 ≤ 100 ms")
    add("dispatch", "client: POST -> sees it final", ms(client))


def start_run(bench: Bench, command: str, agents: list[int]) -> tuple[int, float]:
    began = time.time()
    body = {"command": command, "targets": {"agents": agents}, "timeout": 600}
    status, run = bench.api.post("/api/runs/", body, timeout=300)
    assert status == 201, run
    return run["id"], began


def run_states(bench: Bench, run_id: int) -> dict[str, int]:
    query = "SELECT status, COUNT(*) FROM commands_command WHERE run_id = ? GROUP BY status"
    return dict(bench.db.rows(query, run_id))


def fanout_phase(bench: Bench, held: Held) -> None:
    targets = held.pick(bench.args.fanout)
    times = []
    watch = Watch(bench, held.pids())
    for _ in range(bench.args.fanout_rounds):
        run_id, began = start_run(bench, "true", targets)
        over = bench.db.wait_finished("commands_run", run_id, timeout=600)
        states = run_states(bench, run_id)
        assert states == {"succeeded": len(targets)}, states
        times.append(over - began)
    watch.stop()
    add = bench.table.add
    label = f"run to {len(targets)} agents, POST -> over ({len(times)}x)"
    median = percentile(times, 50)
    target = "≤ 2 s" if len(targets) == 1000 else "≤ 2 s for 1,000"
    add("fanout", label, f"p50 {median:.2f} s, best {min(times):.2f} s", target)
    add("fanout", "results/s", f"{len(targets) / median:.0f}", "≥ 1,000")
    watch.add_rows("fanout")


def expected_stdout(command_id: int, size: int, cap: int | None) -> tuple[bytes, int]:
    """What the API reads back of `bench-output SIZE` on a server storing `cap` bytes a
    stream (None: all of it), and its `stdout_dropped`: past the cap, the head, the marker
    and the tail (docs/agent-protocol.md, "Output limits")."""
    printed = output_for(command_id, size)
    if cap is None or size <= cap:
        return printed, 0
    head, dropped = cap // 2, size - cap
    marker = f"\n[... {dropped:,} bytes dropped ...]\n".encode()
    return printed[:head] + marker + printed[head + dropped :], dropped


def output_phase(bench: Bench, held: Held) -> None:
    """Every agent streams its output at once; then each command's stdout, read back through
    the API, must be exactly what its agent printed (past the cap: its head and tail)."""
    args, add = bench.args, bench.table.add
    size, chunk, cap = args.output_bytes, args.output_chunk, args.max_output_bytes
    targets = held.pick(args.output_agents)
    before = held.stats()
    watch = Watch(bench, held.pids())

    def database() -> list[int]:
        return process_tree(args.database_pid) if args.database_pid else []

    cpu_before = cpu_seconds(bench.server_processes()), cpu_seconds(database())
    run_id, began = start_run(bench, f"{OUTPUT_COMMAND} {size} {chunk}", targets)
    over = bench.db.wait_finished("commands_run", run_id, timeout=900)
    cpu_after = cpu_seconds(bench.server_processes()), cpu_seconds(database())
    watch.stop()
    after = held.stats()
    sent, errors, calls = (
        after[name] - before[name] for name in ("output_bytes", "errors", "progress_calls")
    )
    round_trips = [
        value
        for earlier, later in zip(before["progress_ms"], after["progress_ms"], strict=True)
        for value in later[len(earlier) :]
    ]
    states = run_states(bench, run_id)
    rows = bench.db.rows("SELECT id FROM commands_command WHERE run_id = ? ORDER BY id", run_id)
    verdict: Counter = Counter()
    stored = 0
    for (command_id,) in rows:
        status, command = bench.api.get(f"/api/commands/{command_id}/", timeout=120)
        assert status == 200, command
        data = command["stdout"].encode()
        stored += len(data)
        expected, dropped = expected_stdout(command_id, size, cap)
        if data == expected and command["stdout_dropped"] == dropped:
            verdict["intact"] += 1
        elif data == expected:
            verdict[f"stdout_dropped {command['stdout_dropped']}, not {dropped}"] += 1
        elif len(data) < len(expected):
            verdict["short (lost)"] += 1
        elif len(data) > len(expected):
            verdict["long (doubled)"] += 1
        else:
            verdict["same length, other bytes"] += 1
    elapsed = over - began
    label = f"{len(targets)} agents x {size / 2**20:.2f} MiB, {chunk // 1024} KiB a call"
    if cap is not None:
        label += f", cap {cap / 2**20:.2f} MiB"
    add("output", label, f"{stored / 1e6:.1f} MB read back in {elapsed:.2f} s")
    add("output", "output stored, MB/s", f"{stored / 1e6 / elapsed:.1f}", "≥ 20")
    add("output", "output sent in progress calls", f"{sent / 1e6:.1f} MB ({calls} calls)")
    add("output", "output taken in, MB/s (sent / time)", f"{sent / 1e6 / elapsed:.1f}")
    add("output", "progress call round trip (agent's clock)", ms(round_trips))
    server_cpu = sum(cpu_after[0].values()) - sum(cpu_before[0].values())
    per_call = f"{server_cpu * 1000 / max(calls, 1):.2f} ms"
    add("output", "server CPU per progress call", f"{per_call} ({server_cpu:.1f} s in all)")
    if args.database_pid:
        database_cpu = sum(cpu_after[1].values()) - sum(cpu_before[1].values())
        per_call = f"{database_cpu * 1000 / max(calls, 1):.2f} ms"
        add("output", "PostgreSQL's CPU per progress call", f"{per_call} ({database_cpu:.1f} s)")
    add("output", "agent-side errors", f"{errors} {after['last_errors'] if errors else ''}")
    watch.add_rows("output")
    checked = ", ".join(f"{name}: {n}" for name, n in sorted(verdict.items()))
    add("output", "read back (length, bytes)", f"{checked}; {states}", "all intact")
    if verdict["intact"] != len(targets) or states != {"succeeded": len(targets)}:
        bench.table.failures.append("output lost, doubled or changed: see the output rows")
