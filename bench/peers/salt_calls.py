"""Runs inside Salt's own virtualenv (`bench/peers/.venvs/salt`), started by salt_side.py:
waits until every minion answers, then times `LocalClient().cmd(minions, "cmd.retcode",
["true"])`, one call per round, for each size. Prints one JSON line:
`{"version": ..., "rounds": {"1": [ms, ...], ...}}`. Standard library and Salt only."""

import argparse
import json
import time

import salt.client
import salt.version


def call(client: salt.client.LocalClient, minions: list[str]) -> float:
    """One `cmd.retcode true` to these minions, until each has returned (ms); wrong or
    missing answers raise."""
    began = time.perf_counter()
    answers = client.cmd(minions, "cmd.retcode", ["true"], tgt_type="list", timeout=60)
    spent = (time.perf_counter() - began) * 1000
    if sorted(answers) != sorted(minions) or any(code != 0 for code in answers.values()):
        raise SystemExit(f"cmd.retcode true answered {answers} for {minions}")
    return spent


def wait_for_minions(client: salt.client.LocalClient, minions: list[str], timeout: float) -> None:
    """Until every minion answers `test.ping` (keys accepted, connected to the publisher)."""
    deadline = time.monotonic() + timeout
    while True:
        answers = client.cmd(minions, "test.ping", tgt_type="list", timeout=10)
        if len(answers) == len(minions):
            return
        if time.monotonic() > deadline:
            missing = sorted(set(minions) - set(answers))
            raise SystemExit(f"minions not answering after {timeout} s: {missing}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the master's config file")
    parser.add_argument("--minions", required=True, help="comma-separated minion ids")
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--start-timeout", type=float, default=300)
    args = parser.parse_args()
    minions = args.minions.split(",")
    client = salt.client.LocalClient(c_path=args.config)
    wait_for_minions(client, minions, args.start_timeout)
    rounds: dict[str, list[float]] = {}
    for size in (int(n) for n in args.sizes.split(",")):
        for _ in range(args.warmup):
            call(client, minions[:size])
        rounds[str(size)] = [call(client, minions[:size]) for _ in range(args.rounds)]
    print(json.dumps({"version": salt.version.__version__, "rounds": rounds}), flush=True)


if __name__ == "__main__":
    main()
