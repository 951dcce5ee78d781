#!/usr/bin/env python3
"""Side by side with the peers: `true` on 1, 10 and 25 hosts with Tether, Salt and Ansible.

Each tool runs on this machine over loopback, as an operator would run it, in its own
virtualenv built by this script from exact pins (bench/peers/requirements-*.txt, cached in
bench/peers/.venvs/):
  Tether    a real `tether serve` (SQLite) and N real agents; a run through the API (POST
            /api/runs/, then its SSE stream until `end`), and `tetherctl run` as a process
  Ansible   `ansible all -m command -a true` over SSH to one loopback sshd that N
            inventory hosts (127.0.0.1-N) reach; pipelining, ControlPersist warmed, forks >= N
  Salt      a salt-master and N salt-minions; one `LocalClient().cmd(..., "cmd.retcode",
            ["true"])` call, and the `salt` CLI as a process
One tool at a time (the others' processes stopped), several rounds after a warm-up; it
prints one table: the median of the rounds (min-max) in ms, and the ratios to Tether.

Run from the repository root: `make bench-peers` or `.venv/bin/python bench/peers/run.py`.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.peers import ansible_side, salt_side, tether_side  # noqa: E402
from bench.peers.common import Series, Unavailable, venv  # noqa: E402

TOOLS = ("tether", "ansible", "salt")


def cell(series: Series, size: int) -> str:
    values = series.rounds.get(size)
    if not values:
        return "n/a"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def ratio(slower: Series, faster: Series, size: int) -> str:
    if not slower.rounds.get(size) or not faster.rounds.get(size):
        return "n/a"
    median = statistics.median
    return f"{median(slower.rounds[size]) / median(faster.rounds[size]):.1f}×"


def table(found: dict[str, Series], sizes: list[int]) -> str:
    """Markdown, to paste into docs/benchmarks.md as it is."""
    missing = Series("")
    tether, tetherctl = found.get("Tether", missing), found.get("tetherctl run", missing)
    salt, salt_cli = found.get("Salt", missing), found.get("salt CLI", missing)
    ansible = found.get("Ansible", missing)
    head = [
        "hosts",
        "Tether (API)",
        "`tetherctl run`",
        "Salt (LocalClient)",
        "`salt` CLI",
        "Ansible ad-hoc",
        "Salt/Tether",
        "Ansible/Tether",
        "`salt`/`tetherctl`",
        "Ansible/`tetherctl`",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        row = [str(size)] + [cell(s, size) for s in (tether, tetherctl, salt, salt_cli, ansible)]
        row += [ratio(salt, tether, size), ratio(ansible, tether, size)]
        row += [ratio(salt_cli, tetherctl, size), ratio(ansible, tetherctl, size)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def version_of(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return (done.stdout or done.stderr).strip().splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,10,25", help="fleet sizes (hosts)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size and tool")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--tools", default=",".join(TOOLS), help="a subset of " + ",".join(TOOLS))
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    sizes = sorted({int(n) for n in args.sizes.split(",") if n})
    tools = [tool for tool in args.tools.split(",") if tool]
    if unknown := set(tools) - set(TOOLS):
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")
    # Ctrl-C and TERM end the bench through every `finally` that stops a process (even when
    # started in the background, where a shell leaves SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    bins: dict[str, Path] = {}
    problems: dict[str, str] = {}
    for tool in ("ansible", "salt"):
        if tool in tools:
            try:
                bins[tool] = venv(tool)
            except Unavailable as exc:
                problems[tool] = str(exc)

    tmp = Path(tempfile.mkdtemp(prefix="tether-peers-"))
    found: dict[str, Series] = {}
    notes: list[str] = []
    started = datetime.now(UTC)
    try:
        for tool in tools:
            if tool in problems:
                continue
            print(f"{tool}: {', '.join(map(str, sizes))} hosts ... ({load()})", flush=True)
            began = time.monotonic()
            where = tmp / tool
            where.mkdir()
            try:
                if tool == "tether":
                    series = tether_side.measure(sizes, args.rounds, args.warmup, where)
                elif tool == "ansible":
                    series = [
                        ansible_side.measure(sizes, args.rounds, args.warmup, where, bins[tool])
                    ]
                else:
                    series = salt_side.measure(sizes, args.rounds, args.warmup, where, bins[tool])
            except (Unavailable, RuntimeError, AssertionError, OSError) as exc:
                # One tool that cannot run here leaves the others' figures standing.
                problems[tool] = f"{type(exc).__name__}: {exc}"
                continue
            found.update((s.label, s) for s in series)
            notes.append(f"{tool} took {time.monotonic() - began:.0f} s, then {load()}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    versions = [version_of(["git", "-C", str(ROOT), "log", "-1", "--format=Tether %h"])]
    if "ansible" in bins:
        versions.append(version_of([str(bins["ansible"] / "ansible"), "--version"]))
        versions.append(version_of(["ssh", "-V"]))
    if "salt" in bins:
        versions.append(version_of([str(bins["salt"] / "salt"), "--version"]))
    print()
    print(
        f"`true` on N hosts, end to end, ms: median of {args.rounds} rounds (min–max) after "
        f"{args.warmup} warm-up; {started:%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores"
    )
    print("; ".join(versions))
    print()
    print(table(found, sizes))
    print()
    for note in notes:
        print(f"  {note}")
    for tool, problem in problems.items():
        print(f"  {tool}: not measured: {problem}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; every process the bench started is stopped", file=sys.stderr)
        sys.exit(130)
