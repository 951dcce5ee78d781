"""What the load bench reads beside the HTTP API, the server's processes (/proc) and its
database (directly, so that waiting for a command to end costs the server nothing), and how
it reports the figures."""

import contextlib
import os
import sqlite3
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 on), or None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now: `tether serve` and the processes it starts
    (`--workers N`)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User and system CPU time of each process so far."""
    times = {}
    for pid in pids:
        if fields := _stat(pid):
            times[pid] = (int(fields[11]) + int(fields[12])) / TICK
    return times


def memory_mib(pids: list[int], field: str) -> float:
    """A /proc/PID/smaps_rollup field summed over the processes: `Rss` counts the pages forked
    processes share once per process, `Pss` splits them among the sharers."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
    return total / 1024


def threads_and_fds(pids: list[int]) -> tuple[int, int]:
    threads = fds = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            threads += len(os.listdir(f"/proc/{pid}/task"))
            fds += len(os.listdir(f"/proc/{pid}/fd"))
    return threads, fds


def runqueue_seconds(pids: list[int]) -> dict[int, float]:
    """How long the threads of each process have waited for a CPU while ready to run
    (/proc/PID/task/TID/schedstat): on a machine shared with other work, the time the
    server wanted a core and did not get one."""
    waits = {}
    for pid in pids:
        total = 0
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, IndexError):
                    total += int((task / "schedstat").read_text().split()[1])
            waits[pid] = total / 1e9
    return waits


class CpuMeter:
    """CPU used by a set of processes over a window, and time they waited for one, in % of
    one core. Processes started in the window count from zero; processes that ended in it
    lose their last share (the server's processes live through a run)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cpu, self.waits = cpu_seconds(pids), runqueue_seconds(pids)
        self.began = time.monotonic()

    def percent(self, pids: list[int] | None = None) -> float:
        return self._share(self.cpu, cpu_seconds(pids or self.pids))

    def waited(self, pids: list[int] | None = None) -> float:
        return self._share(self.waits, runqueue_seconds(pids or self.pids))

    def _share(self, before: dict[int, float], now: dict[int, float]) -> float:
        used = sum(value - before.get(pid, 0.0) for pid, value in now.items())
        return 100 * used / (time.monotonic() - self.began)

    def summary(self, pids: list[int] | None = None) -> str:
        return f"{self.percent(pids):.1f} % (waited for a CPU: {self.waited(pids):.0f} %)"


def percentile(values: list[float], p: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def moment(value: Any) -> float:
    """A timestamp column as a Unix time: PostgreSQL's are datetimes, SQLite's are text that
    Django writes in UTC without a zone."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


class Database:
    """A read-only look at the server's database: SQLite's file, or the PostgreSQL the
    caller gave (psycopg, which that server needs anyway). Queries use `?` placeholders."""

    def __init__(self, sqlite_file: Path, url: str | None) -> None:
        self.postgres = bool(url)
        if url:
            import psycopg

            self.conn: Any = psycopg.connect(url, autocommit=True)
        else:
            self.conn = sqlite3.connect(sqlite_file, timeout=20, isolation_level=None)

    def rows(self, query: str, *params: Any) -> list[tuple]:
        if self.postgres:
            query = query.replace("?", "%s")
        cursor = self.conn.execute(query, params)
        return cursor.fetchall()

    def wait_finished(self, table: str, row_id: int, timeout: float) -> float:
        """Until the row has its `finished_at`; returns it. Looks every 2 ms at first, less
        often as the wait grows (a query costs the database server a little)."""
        began = time.monotonic()
        while (waited := time.monotonic() - began) < timeout:
            found = self.rows(f"SELECT finished_at FROM {table} WHERE id = ?", row_id)
            if found and found[0][0]:
                return moment(found[0][0])
            time.sleep(min(0.002 + waited / 100, 0.02))
        raise RuntimeError(f"{table} {row_id} not finished in {timeout} s")

    def close(self) -> None:
        self.conn.close()


def ms(values: list[float]) -> str:
    return f"p50 {percentile(values, 50):.1f} ms, p99 {percentile(values, 99):.1f} ms"


@dataclass
class Table:
    """The figures, printed as they come and as one Markdown table at the end (the form
    docs/benchmarks.md records them in)."""

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # what the bench found broken

    def add(self, phase: str, measure: str, value: str, target: str = "") -> None:
        self.rows.append((phase, measure, value, target))
        print(f"  {phase:9s} {measure:46s} {value}", flush=True)

    def print(self, title: str) -> None:
        print(f"\n{title}\n")
        print("| phase | measure | value | issue 12 target |")
        print("|---|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")
        for failure in self.failures:
            print(f"\nFAILED: {failure}")
