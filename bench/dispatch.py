#!/usr/bin/env python3
"""Dispatch latency: queue -> agent start -> result for `true`, one agent, SQLite (or
PostgreSQL: TETHER_DATABASE_URL, a database of its own there).

Starts a real `tether serve` and a real agent on loopback with production timers, sends
`--count` commands one after another and prints p50/p90/p99 of:
  queue->start   command created (server clock) to process started (agent clock, same host)
  queue->result  command created to result stored (both server clock)
  client         POST send_command until the client sees the command final
once with nobody watching (the bench reads the database itself) and once with a client watching
the command's SSE stream, as a user would,
plus the resident memory of the idle agent and of the server.

Run from the repository root: `make bench` or `.venv/bin/python bench/dispatch.py`.
"""

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import (  # noqa: E402
    ADMIN_PASSWORD,
    Fleet,
    TetherServer,
    database_label,
    kill_group,
)

PRODUCTION_TIMERS = {
    "TETHER_HEARTBEAT_INTERVAL": "30",
    "TETHER_POLL_INTERVAL": "5",
    "TETHER_LONG_POLL_TIMEOUT": "25",
    "TETHER_SWEEP_INTERVAL": "10",
    "TETHER_POLL_RECHECK": "2",
    "TETHER_LOG_LEVEL": "WARNING",
}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(values: list[float]) -> str:
    qs = statistics.quantiles(values, n=100, method="inclusive")
    return f"p50 {qs[49]:6.1f} ms   p90 {qs[89]:6.1f} ms   p99 {qs[98]:6.1f} ms"


def wait_end(fleet: Fleet, command_id: int) -> None:
    """Block until the SSE stream of the command sends its `end` event."""
    request = urllib.request.Request(
        f"{fleet.server.url}/api/commands/{command_id}/stream/", headers=fleet.api.headers
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        for raw in response:
            if raw.startswith(b"event: end"):
                return
    raise RuntimeError(f"stream of {command_id} closed without an end event")


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def wait_db(fleet: Fleet, command_id: int) -> None:
    """Block until the row is final, reading the database directly: the server sees no extra
    load."""
    deadline = time.monotonic() + 30
    with fleet.server.db() as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT finished_at FROM commands_command WHERE id = ?", (command_id,)
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.001)
    raise RuntimeError(f"command {command_id} not final in 30 s")


def measure(fleet: Fleet, count: int, watch: str) -> dict[str, list[float]]:
    to_start, to_result, client = [], [], []
    for _ in range(count):
        began = time.perf_counter()
        command = fleet.send("true", timeout=30)
        (wait_end if watch == "sse" else wait_db)(fleet, command["id"])
        client.append((time.perf_counter() - began) * 1000)
        done = fleet.command(command["id"])
        assert done["status"] == "succeeded", done
        created = seconds(done["created_at"])
        to_start.append((seconds(done["started_at"]) - created) * 1000)
        to_result.append((seconds(done["finished_at"]) - created) * 1000)
    return {"queue->start": to_start, "queue->result": to_result, "client": client}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    server = TetherServer(tmp / "data", PRODUCTION_TIMERS).setup().start()
    try:
        fleet = Fleet(server, server.login("admin", ADMIN_PASSWORD), tmp)
        fleet.start_agent()
        time.sleep(2)  # let the agent settle into its idle long-poll before measuring memory
        agent_rss_fresh = rss_mib(fleet.agent_proc.proc.pid)
        for _ in range(args.warmup):
            fleet.run("true")

        results = {mode: measure(fleet, args.count, mode) for mode in ("db", "sse")}
        time.sleep(2)
        agent_rss = rss_mib(fleet.agent_proc.proc.pid)
        server_rss = rss_mib(server.proc.pid)
    finally:
        if fleet.agent_proc and fleet.agent_proc.proc:
            kill_group(fleet.agent_proc.proc)
        server.kill()

    print(f"dispatch of `true`, {args.count} commands per mode, one agent, {database_label()}")
    for mode, label in (
        ("db", "nobody watching (bench reads the database)"),
        ("sse", "a client watching the command's SSE stream"),
    ):
        print(f"  {label}:")
        for name, values in results[mode].items():
            print(f"    {name:14s} {percentiles(values)}")
    total = args.warmup + 2 * args.count
    print(
        f"  agent RSS idle: {agent_rss_fresh:.1f} MiB fresh, {agent_rss:.1f} MiB after "
        f"{total} commands   server RSS {server_rss:.1f} MiB"
    )


if __name__ == "__main__":
    main()
