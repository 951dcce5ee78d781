#!/usr/bin/env python3
"""What idle agents cost the server: N long-polls held at once.

Starts a real `tether serve` (SQLite, production timers), registers N agents of the older
dialect (no signing, so the bench stays small), holds one long-poll per agent open and
prints the server's threads, file descriptors and resident memory before and while they
are held, then queues one command for one agent and times how fast its held poll answers.

Run from the repository root: `.venv/bin/python bench/held_polls.py --agents 500`.
"""

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dispatch import PRODUCTION_TIMERS, rss_mib  # noqa: E402
from tests.conftest import ADMIN_PASSWORD, Api, Fleet, TetherServer, database_label  # noqa: E402


def server_stats(pid: int) -> str:
    threads = len(os.listdir(f"/proc/{pid}/task"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return f"threads {threads:4d}   fds {fds:5d}   RSS {rss_mib(pid):6.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=500)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tether-held-"))
    env = {**PRODUCTION_TIMERS, "TETHER_REGISTER_RATE": "100000/min"}
    server = TetherServer(tmp / "data", env).setup().start()
    try:
        fleet = Fleet(server, server.login("admin", ADMIN_PASSWORD), tmp)
        tokens = []
        for i in range(args.agents):
            status, body = Api(server.url).post(
                "/api/agents/register/",
                {"server_token": fleet.server_token, "hostname": f"held-{i}"},
            )
            assert status == 201, body
            tokens.append((body["agent_id"], body["token"]))
        before = server_stats(server.proc.pid)

        answered: dict[int, float] = {}

        def hold(agent_id: int, token: str) -> None:
            with contextlib.suppress(OSError):  # the server is stopped under the others
                Api(server.url, {"X-Agent-Token": token}).get(
                    "/api/agents/poll/?wait=25", timeout=40
                )
                answered[agent_id] = time.perf_counter()

        threads = [threading.Thread(target=hold, args=t, daemon=True) for t in tokens]
        for thread in threads:
            thread.start()
        time.sleep(5)  # every poll is in and held (wait=25 s)
        held = server_stats(server.proc.pid)

        target = tokens[len(tokens) // 2][0]
        sent = time.perf_counter()
        fleet.send_to(target, "true")
        deadline = time.monotonic() + 10
        while target not in answered and time.monotonic() < deadline:
            time.sleep(0.001)
        wake_ms = (answered[target] - sent) * 1000 if target in answered else float("nan")
    finally:
        server.kill()

    print(f"{args.agents} held long-polls, one server process, {database_label()}")
    print(f"  before: {before}")
    print(f"  held:   {held}")
    print(f"  a command queued for one of them answered its held poll in {wake_ms:.1f} ms")


if __name__ == "__main__":
    main()
