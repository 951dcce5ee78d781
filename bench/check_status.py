#!/usr/bin/env python3
"""What many pull-mode status checks at once cost the server.

Starts a real `tether serve` (SQLite, production timers) and N agents of Tether's dialect,
each with a certificate and an RPC port that points at a tarpit: a listener that accepts the
TCP connection and never speaks TLS, so every check waits its whole TETHER_RPC_TIMEOUT (3 s).
Fires N `check_status` calls at once and measures, meanwhile, how fast `/healthz` answers and
how many threads the server holds. Checks on the event loop finish together in about one
timeout; checks on threads would queue behind the thread pool.

Run from the repository root: `.venv/bin/python bench/check_status.py --agents 100`.
"""

import argparse
import contextlib
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dispatch import PRODUCTION_TIMERS  # noqa: E402
from bench.held_polls import server_stats  # noqa: E402
from tests.conftest import ADMIN_PASSWORD, Api, Fleet, TetherServer  # noqa: E402

SETUP = """
from tether.fleet.models import Agent
from tether.pki.services import issue_certificate
agents = Agent.objects.filter(server_id={server_id})
agents.update(rpc_port={port}, address="127.0.0.1")
for agent in agents:
    issue_certificate(agent=agent)
"""


def tarpit() -> tuple[socket.socket, int, list[socket.socket]]:
    """A port that takes connections and never answers (a host that hangs mid-handshake)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1], held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=100)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tether-check-"))
    env = {**PRODUCTION_TIMERS, "TETHER_REGISTER_RATE": "100000/min"}
    server = TetherServer(tmp / "data", env).setup().start()
    listener, port, _held = tarpit()
    try:
        api = server.login("admin", ADMIN_PASSWORD)
        fleet = Fleet(server, api, tmp)
        ids = []
        for i in range(args.agents):
            status, body = Api(server.url).post(
                "/api/agents/register/",
                {
                    "server_token": fleet.server_token,
                    "hostname": f"h-{i}",
                    "signing": "hmac-sha256",
                },
            )
            assert status == 201, body
            ids.append(body["agent_id"])
        server.cli("shell", "-c", SETUP.format(server_id=fleet.server_id, port=port))
        before = server_stats(server.proc.pid)

        answers: list[dict] = []
        health: list[float] = []
        peak = {"threads": 0}
        done = threading.Event()

        def check(agent_id: int) -> None:
            answers.append(api.post(f"/api/agents/{agent_id}/check_status/", timeout=60)[1])

        def watch() -> None:
            while not done.is_set():
                started = time.perf_counter()
                Api(server.url).get("/healthz", timeout=30)
                health.append((time.perf_counter() - started) * 1000)
                stats = server_stats(server.proc.pid)
                peak["threads"] = max(peak["threads"], int(stats.split()[1]))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        began = time.perf_counter()
        threads = [threading.Thread(target=check, args=(i,)) for i in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        done.set()
        watcher.join()
    finally:
        server.kill()
        listener.close()

    unreachable = sum(1 for a in answers if a.get("reachable") is False)
    errors = {a.get("error", "")[:40] for a in answers}
    health.sort()
    print(f"{args.agents} check_status calls at once against hung RPC ports (3 s timeout)")
    print(f"  all answered in {elapsed:.2f} s; {unreachable} unreachable; errors: {errors}")
    print(
        f"  /healthz meanwhile: n={len(health)} p50 {statistics.median(health):.1f} ms, "
        f"max {health[-1]:.1f} ms"
    )
    print(f"  server before: {before}; peak threads during: {peak['threads']}")


if __name__ == "__main__":
    main()
