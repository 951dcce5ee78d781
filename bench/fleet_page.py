#!/usr/bin/env python3
"""What the fleet page's live status costs the server at fleet size: each open page fetches
the fleet fragment (`/fleet/rows/`) every 3 s, sending back the fingerprint of what it shows.

Starts a real `tether serve` (SQLite, production timers) over N agents written straight into
its database (tests/scale.py's bulk_fleet: ten agents per server, 80 % online), logs in as the
admin through the login form (session and CSRF, as a browser does), then fetches, M times each:
- the fragment of a page whose fingerprint no longer holds (a changed fleet: 100 rows drawn),
- the fragment of an unchanged page (the poll of a page left open: a 204, nothing drawn),
- the same two with a tag filter, the whole page, and `/healthz` (the floor: any request),
and reports each one's latency and the server's CPU time per fetch, then what that means for
a number of operators with the page open.

The agents here never send a heartbeat, so the sweep is turned off: it would mark the online
ones offline halfway through and turn "unchanged" pages into changed ones.

Run from the repository root: `.venv/bin/python bench/fleet_page.py --agents 10000`.
"""

import argparse
import http.cookiejar
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dispatch import PRODUCTION_TIMERS  # noqa: E402
from tests.conftest import ADMIN_PASSWORD, TetherServer  # noqa: E402

POLL_SECONDS = 3  # hx-trigger="every 3s" on the fleet page
BULK_FLEET = """
import sys
sys.path.insert(0, {root!r})
import django
django.setup()
from django.contrib.auth import get_user_model
from tests.scale import bulk_fleet
bulk_fleet(get_user_model().objects.get(username="admin"), {agents})
"""


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


def seen(opener: urllib.request.OpenerDirector, url: str) -> str:
    """The fingerprint a page shown at `url` sends back with its next poll."""
    body = opener.open(url).read().decode()
    return re.search(r'name="seen" value="(\w+)"', body).group(1)


def measure(
    opener: urllib.request.OpenerDirector, pid: int, url: str, fetches: int, status: int
) -> tuple[float, float, float]:
    """p50 and p99 latency (ms), and the server's CPU ms per fetch, of `fetches` GETs."""
    latencies = []
    cpu_before = cpu_seconds(pid)
    for _ in range(fetches):
        started = time.perf_counter()
        with opener.open(url) as response:
            response.read()
            assert response.status == status, (url, response.status)
        latencies.append((time.perf_counter() - started) * 1000)
    cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / fetches
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1], cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--fetches", type=int, default=200)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tether-fleet-"))
    env = {**PRODUCTION_TIMERS, "TETHER_SWEEP_INTERVAL": "86400"}
    server = TetherServer(tmp / "data", env).setup()
    bulk = BULK_FLEET.format(root=str(ROOT), agents=args.agents)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", bulk],
        env={**server.env, "DJANGO_SETTINGS_MODULE": "tether.settings"},
        check=True,
    )
    print(f"{args.agents} agents written in {time.perf_counter() - started:.1f} s")
    server.start()
    try:
        opener = browser_session(server.url)
        rows = server.url + "/fleet/rows/"
        first = opener.open(rows).read().decode()
        assert first.count("data-agent=") == min(args.agents, 100), "not a page of rows"
        assert f'id="count-total">{args.agents}<' in first, "the counters miss agents"
        poll = "?q=&status=&tag=&page=1"  # what the page's poll sends, as htmx writes it
        tagged = "?q=&status=&tag=rack-7&page=1"
        cases = [
            ("fragment, changed (100 rows drawn)", f"{rows}{poll}&seen=stale", 200),
            ("fragment, unchanged (204)", f"{rows}{poll}&seen={seen(opener, rows + poll)}", 204),
            ("fragment by tag, changed", f"{rows}{tagged}&seen=stale", 200),
            (
                "fragment by tag, unchanged",
                f"{rows}{tagged}&seen={seen(opener, rows + tagged)}",
                204,
            ),
            ("whole page", server.url + "/", 200),
            # The floor: any request through this server's Django stack (one query).
            ("/healthz, for comparison", server.url + "/healthz", 200),
        ]
        results = [
            (name, *measure(opener, server.proc.pid, url, args.fetches, status))
            for name, url, status in cases
        ]
    finally:
        server.kill()

    print(f"fleet page with {args.agents} agents, {args.fetches} fetches each, one session")
    print(f"  {'':38} {'p50':>8} {'p99':>8} {'CPU/fetch':>10}")
    for name, p50, p99, cpu_ms in results:
        print(f"  {name:38} {p50:6.1f}ms {p99:6.1f}ms {cpu_ms:8.1f}ms")
    for name, _, _, cpu_ms in results[:2]:
        shares = ", ".join(
            f"{operators} pages {operators / POLL_SECONDS * cpu_ms / 10:.1f} % of a core"
            for operators in (10, 50)
        )
        print(f"  open pages polling every {POLL_SECONDS} s, all {name.split(', ')[1]}: {shares}")


if __name__ == "__main__":
    main()
