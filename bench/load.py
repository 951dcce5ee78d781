#!/usr/bin/env python3
"""Load: the server under a fleet's weight, phase by phase, in one table (issue 12, item 7).

Starts a real `tether serve` (SQLite, or the PostgreSQL of --database-url, migrated first;
production timers: 25 s long-polls) and measures:
  1 api       50 API clients (asyncio, keep-alive) each sending `true` to one of 3 real
              agents (agent/main.py) and reading commands back (the command just sent, then
              the agent's history), for --duration: requests/s, p50/p99, errors
  2 held      --agents simulated agents (bench/sim.py: asyncio, many per process, several
              processes, both dialects: --signed-share of them sign their requests as
              agent/main.py does, the rest speak the older bearer-token dialect), registered
              concurrently, then held idle for --duration: server CPU (the `tether serve`
              process and its children, from /proc) in % of one core, RSS, polls/s
  3 dispatch  one command to one held agent, --dispatches times (a different agent each
              time, both dialects): queue -> the agent has it (its clock) -> result stored
  4 fanout    a run (POST /api/runs/) to --fanout of the held agents: time to the run over
              (from the POST), results/s
  5 output    a run of `bench-output SIZE CHUNK` to --output-agents held agents, which stream
              SIZE bytes each in CHUNK-sized progress calls, then report: MB/s stored, and
              every command's stdout read back through the API and compared (length, hash);
              with --max-output-bytes CAP (the server's TETHER_MAX_OUTPUT_BYTES), a SIZE past
              CAP reads back as the head, the dropped marker and the tail, and its
              `stdout_dropped` must be SIZE - CAP
Phases 3-5 use the agents of phase 2, which are started whenever one of them runs.

The bench learns that a command or a run is over by reading the database itself, so waiting
costs the server nothing. Its own clients run beside the server on the same cores.

Run from the repository root: `make bench-load` or `.venv/bin/python bench/load.py --quick`.
"""

import argparse
import contextlib
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dispatch import PRODUCTION_TIMERS  # noqa: E402
from bench.load_phases import (  # noqa: E402
    AGENTS_PER_PROCESS,
    Bench,
    Held,
    api_phase,
    dispatch_phase,
    fanout_phase,
    idle_phase,
    output_phase,
    start_held,
)
from bench.measure import Database, Table  # noqa: E402
from tests.conftest import ADMIN_PASSWORD, BIN, Api, TetherServer, spawn, wait_for  # noqa: E402
from tests.pgcluster import PgCluster  # noqa: E402

PHASES = ("api", "held", "dispatch", "fanout", "output")
DEFAULT_MAX_OUTPUT = 16 * 2**20  # the server's TETHER_MAX_OUTPUT_BYTES when none is given


class LoadServer(TetherServer):
    """A `tether serve` with options of its own (`--workers N`), on SQLite or on a database
    the caller provides (which may have seen other runs: the admin's name is fresh)."""

    def __init__(self, data_dir: Path, env: dict[str, str], serve_args: list[str]) -> None:
        super().__init__(data_dir, env)
        self.serve_args = serve_args
        self.admin = f"bench-{uuid.uuid4().hex[:8]}"

    def setup(self) -> "LoadServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cli("migrate", "--noinput", "-v0")
        self.cli("createsuperuser", "--noinput", "--username", self.admin, "--email", "b@b.example")
        return self

    def start(self) -> "LoadServer":
        bind = f"127.0.0.1:{self.port}"
        argv = [str(BIN / "tether"), "serve", "--bind", bind, *self.serve_args]
        self.proc = spawn(argv, env=self.env, log=self.log)

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-2000:]
            with contextlib.suppress(OSError):
                return Api(self.url).get("/healthz", timeout=2)[0] == 200
            return False

        wait_for(healthy, timeout=60, interval=0.1, what="server /healthz")
        return self


def raise_nofile(agents: int) -> str:
    """Each held agent is a socket in the server (and one in a simulator, which holds a share
    of them): both inherit this limit."""
    want = agents + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # raising the hard limit needs root
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return f"RLIMIT_NOFILE {soft}" + (f" (fewer than wanted: {want})" if soft < want else "")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (< 1 min)")
    parser.add_argument("--phases", default=",".join(PHASES), help="of " + ",".join(PHASES))
    parser.add_argument("--agents", type=int, help="simulated agents held (10000)")
    parser.add_argument("--duration", type=float, help="seconds of API load, of idle (30)")
    parser.add_argument("--settle", type=float, help="s from all online to the idle window (25)")
    parser.add_argument("--signed-share", type=float, default=0.5, help="of the agents")
    parser.add_argument(
        "--database-url", help="an empty PostgreSQL database to run on (migrated first)"
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="run on a throwaway PostgreSQL cluster of its own (tests/pgcluster.py)",
    )
    parser.add_argument("--server-workers", type=int, help="`tether serve --workers N`")
    parser.add_argument(
        "--database-pid", type=int, help="a local PostgreSQL's postmaster: its CPU is shown too"
    )
    parser.add_argument("--api-clients", type=int, default=50)
    parser.add_argument("--sim-processes", type=int, help=f"default: 1 per {AGENTS_PER_PROCESS}")
    parser.add_argument("--register-concurrency", type=int, default=64, help="in all")
    parser.add_argument("--dispatches", type=int, help="single dispatches timed (50)")
    parser.add_argument("--fanout", type=int, help="agents in the fan-out run (1000)")
    parser.add_argument("--fanout-rounds", type=int, help="(3)")
    parser.add_argument("--output-agents", type=int, help="commands streaming at once (100)")
    parser.add_argument("--output-bytes", type=int, help="output per command (1 MiB)")
    parser.add_argument("--output-chunk", type=int, default=64 * 1024, help="bytes per call")
    parser.add_argument(
        "--max-output-bytes",
        type=int,
        help="the server's TETHER_MAX_OUTPUT_BYTES (default: the server's, 16 MiB)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    args = parser.parse_args(argv)
    defaults: dict[str, Any] = dict(
        agents=10_000, duration=30, settle=25, dispatches=50, fanout=1000, fanout_rounds=3,
        output_agents=100, output_bytes=2**20,
    )  # fmt: skip
    if args.quick:
        defaults.update(agents=200, duration=5, settle=3, dispatches=20, fanout_rounds=2)
        defaults.update(output_agents=20, output_bytes=256 * 1024)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.fanout = min(args.fanout, args.agents)
    args.output_agents = min(args.output_agents, args.agents)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(args.phases) - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    if not 0 <= args.signed_share <= 1:
        parser.error("--signed-share is a fraction, 0 to 1")
    if args.max_output_bytes is not None and args.max_output_bytes < 1:
        parser.error("--max-output-bytes is at least 1")
    # The older dialect's result carries the whole output again, in one body, which the
    # server takes up to 2 x the cap + 64 KiB (MAX_RESULT_BYTES): past that it answers 413
    # and the command never ends.
    cap = args.max_output_bytes or DEFAULT_MAX_OUTPUT
    if "output" in args.phases and args.signed_share < 1 and args.output_bytes > 2 * cap:
        parser.error(
            f"--output-bytes {args.output_bytes} does not fit the older dialect's result "
            f"(at most 2 x the cap, {2 * cap}): use --signed-share 1"
        )
    return args


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    """The server's data dir and every log; kept when asked, or when the run failed."""
    tmp = Path(tempfile.mkdtemp(prefix="tether-load-"))
    try:
        yield tmp
    except BaseException:
        keep = True
        raise
    finally:
        if keep:
            print(f"data and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def load_average() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    args = parse()
    if args.postgres and not args.database_url:
        with PgCluster() as cluster:
            args.database_url = cluster.url
            pid_file = cluster.data_dir / "postmaster.pid"
            args.database_pid = args.database_pid or int(pid_file.read_text().split()[0])
            run(args)
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    limit = raise_nofile(args.agents)
    env = {**PRODUCTION_TIMERS, "TETHER_LOST_GRACE": "300", "TETHER_REGISTER_RATE": "10000/s"}
    serve_args: list[str] = []
    if args.database_url:
        env["TETHER_DATABASE_URL"] = args.database_url
    if args.max_output_bytes is not None:
        env["TETHER_MAX_OUTPUT_BYTES"] = str(args.max_output_bytes)
    if args.server_workers is not None:
        serve_args += ["--workers", str(args.server_workers)]
    database = "PostgreSQL" if args.database_url else "SQLite (WAL)"
    began = time.monotonic()
    table = Table()
    with workspace(args.keep) as tmp:
        server = LoadServer(tmp / "data", env, serve_args).setup().start()
        db = Database(server.data_dir / "tether.sqlite3", args.database_url)
        held: Held | None = None
        try:
            api = server.login(server.admin, ADMIN_PASSWORD)
            bench = Bench(server, db, api, tmp, args, table)
            print(f"server {server.url}, {database}, {limit}, {load_average()} at the start")
            print(f"phases: {', '.join(args.phases)}")
            if "api" in args.phases:
                api_phase(bench)
            if set(args.phases) & {"held", "dispatch", "fanout", "output"}:
                held = start_held(bench)
            for name, phase in (
                ("held", idle_phase),
                ("dispatch", dispatch_phase),
                ("fanout", fanout_phase),
                ("output", output_phase),
            ):
                if held and name in args.phases:
                    phase(bench, held)
        finally:
            if held:
                held.stop()
            db.close()
            server.kill(signal.SIGTERM)
            command = " ".join(["tether serve", *serve_args])
            table.print(
                f"Load, {database}, `{command}`, production timers (25 s long-polls), "
                f"{args.agents} simulated agents; {time.monotonic() - began:.0f} s in all, "
                f"{load_average()} at the end (2 cores); CPU in % of one core"
            )
    if table.failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
