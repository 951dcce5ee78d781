"""The server's own instruments, for `GET /metrics` (docs/metrics.md).

Plumbing: every app may import this module, and it imports nothing of Tether. What is
counted in memory lives here; what the database already knows (agents and commands by
status, the queue's depth) is read at scrape time by `tether.monitoring`.

Several server processes: when `PROMETHEUS_MULTIPROC_DIR` is set before this module (and so
prometheus_client) is first imported, every process writes its values to files in that
directory and a scrape of any one of them reads all the files (`process_metrics`), so one
scrape shows the whole server. The directory must be fresh for each start of the server, and
a process that exits is passed to `process_exited` so its held polls stop counting.
"""

import os
import re
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, multiprocess
from prometheus_client.registry import Collector

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

HELD_POLLS = Gauge(
    "tether_held_polls",
    "Agent long-polls held open now, waiting for work.",
    # Summed over the processes alive; a dead process's polls are gone with it.
    multiprocess_mode="livesum",
)
"""Wrap the wait of each held poll: `with HELD_POLLS.track_inprogress(): ...` (it works
around an `await` too, and counts down when the poll answers, times out or is cancelled)."""

DISPATCH_SECONDS = Histogram(
    "tether_dispatch_seconds",
    "Time from a command's queueing to its delivery to the agent.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
"""Observe once per command, when a poll hands it out for the first time (`delivery_count`
1): `DISPATCH_SECONDS.observe((delivered_at - command.created_at).total_seconds())`. A
redelivery after a lost lease is not a dispatch."""

OUTPUT_BYTES = Counter(
    "tether_output_bytes",
    "Command output received from agents, each byte once (resent chunks count once).",
    ["stream"],
)
"""Counted by commands.services when the bytes are committed; label `stream` is stdout or
stderr."""

REQUESTS = Counter(
    "tether_requests",
    "HTTP requests answered, by URL pattern, method and status code.",
    ["route", "method", "code"],
)
"""Counted through `observe_request`, which keeps the labels bounded."""

UNMATCHED_ROUTE = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A router's regex pattern (`agents/(?P<pk>\d+)/$`) reads as a path pattern (`agents/<pk>/`).
_NAMED_GROUP = re.compile(r"\(\?P<(\w+)>[^)]*\)")


def route_label(pattern: str | None) -> str:
    """The label of a URL pattern (Django's `ResolverMatch.route`): `/api/agents/<pk>/`.
    No pattern (the path resolved to nothing) is one label, whatever the path was."""
    if pattern is None:
        return UNMATCHED_ROUTE
    route = _NAMED_GROUP.sub(r"<\1>", pattern).replace("^", "").replace("$", "")
    return route if route.startswith("/") else "/" + route


def observe_request(route: str | None, method: str, code: int) -> None:
    """Count one answered request. `route` is the URL pattern that matched (Django's
    `ResolverMatch.route`, e.g. `match.route` in the thin agent route), never the raw path:
    None for a path that matched nothing. Unusual methods count as `other`, so a client cannot
    grow the label set."""
    key = (route, method, code)
    counter = _request_counters.get(key)
    if counter is None:  # labels() takes a lock and builds its key: once per label set
        label = method.upper() if method.upper() in METHODS else "other"
        counter = REQUESTS.labels(route=route_label(route), method=label, code=str(code))
        if len(_request_counters) < 10_000:
            _request_counters[key] = counter
    counter.inc()


_request_counters: dict[tuple, Any] = {}


def process_metrics() -> Collector:
    """The instruments of the whole server, as one scrape should show them: this process's,
    or in multiprocess mode those of every process writing to PROMETHEUS_MULTIPROC_DIR."""
    if MULTIPROCESS:
        return multiprocess.MultiProcessCollector(None)
    return REGISTRY


def process_exited(pid: int) -> None:
    """Tell the metrics that server process `pid` is gone (call it from whatever starts the
    processes): its held polls stop counting. Counters and histograms keep its values."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)
