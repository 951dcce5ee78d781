#!/usr/bin/env python3
"""What the fleet page's live status costs the server: each open page fetches the fleet
fragment (`/fleet/rows/`) every 3 s.

Starts a real `tether serve` (SQLite, production timers), registers N agents, logs in as the
admin through the login form (session and CSRF, as a browser does), fetches the fragment M
times and reports its latency and the server's CPU time per fetch, then what that means for
a number of operators with the page open.

Run from the repository root: `.venv/bin/python bench/fleet_page.py --agents 200`.
"""

import argparse
import http.cookiejar
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dispatch import PRODUCTION_TIMERS  # noqa: E402
from tests.conftest import ADMIN_PASSWORD, Api, Fleet, TetherServer  # noqa: E402

POLL_SECONDS = 3  # hx-trigger="every 3s" on the fleet page


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def browser_session(url: str) -> urllib.request.OpenerDirector:
    """Log in through the form, as a browser would: CSRF cookie, then the POST."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(url + "/login/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode(
        {"username": "admin", "password": ADMIN_PASSWORD, "csrfmiddlewaretoken": token}
    ).encode()
    request = urllib.request.Request(url + "/login/", data=form, headers={"Referer": url})
    opener.open(request).read()
    return opener


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--fetches", type=int, default=300)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tether-fleet-"))
    env = {**PRODUCTION_TIMERS, "TETHER_REGISTER_RATE": "100000/min"}
    server = TetherServer(tmp / "data", env).setup().start()
    try:
        fleet = Fleet(server, server.login("admin", ADMIN_PASSWORD), tmp)
        for i in range(args.agents):
            status, body = Api(server.url).post(
                "/api/agents/register/",
                {"server_token": fleet.server_token, "hostname": f"host-{i:04d}"},
            )
            assert status == 201, body
        opener = browser_session(server.url)
        first = opener.open(server.url + "/fleet/rows/").read().decode()
        assert first.count("host-") >= args.agents, "the fragment does not list the agents"
        latencies = []
        cpu_before = cpu_seconds(server.proc.pid)
        for _ in range(args.fetches):
            started = time.perf_counter()
            opener.open(server.url + "/fleet/rows/").read()
            latencies.append((time.perf_counter() - started) * 1000)
        cpu_ms = (cpu_seconds(server.proc.pid) - cpu_before) * 1000 / args.fetches
    finally:
        server.kill()

    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"fleet fragment with {args.agents} agents, {args.fetches} fetches, one session")
    print(f"  latency p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms")
    print(f"  server CPU {cpu_ms:.1f} ms per fetch")
    for operators in (10, 50):
        share = operators / POLL_SECONDS * cpu_ms / 1000 * 100
        print(
            f"  {operators} open fleet pages, a fetch each per {POLL_SECONDS} s: "
            f"{share:.1f}% of a core"
        )


if __name__ == "__main__":
    main()
