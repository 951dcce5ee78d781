"""Salt: a `salt-master` and N `salt-minion`s on loopback (ZeroMQ, Salt's default
transport), each daemon with its own config, keys, cache and sockets under the bench's
temporary directory, keys accepted automatically. A round is `true` on N minions, measured
two ways:

- `Salt`: `salt.client.LocalClient().cmd(minions, "cmd.retcode", ["true"])`, one call, in
  a long-lived process inside Salt's virtualenv (salt_calls.py);
- `salt CLI`: the command an operator types, `salt -L MINIONS cmd.retcode '"true"'`, as a
  process (the quotes: the CLI reads arguments as YAML, and a bare `true` is a boolean).

Minion defaults are kept (a job runs in a forked process, returns go through the master's
request workers), except `enable_fqdns_grains: False`: that grain resolves names at
start-up, which only slows the start on a machine without DNS.
"""

import getpass
import json
import os
import socket
import subprocess
from pathlib import Path

from bench.peers.common import HERE, Series, Unavailable, stop_groups, timed_process
from tests.conftest import free_port, spawn, wait_for


def write_config(path: Path, settings: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def measure(sizes: list[int], rounds: int, warmup: int, tmp: Path, bin_dir: Path) -> list[Series]:
    api_series, cli_series = Series("Salt"), Series("salt CLI")
    home = tmp / "salt"
    publish_port, ret_port = free_port(), free_port()
    user = getpass.getuser()
    write_config(
        home / "master",
        {
            "root_dir": str(home / "master-root"),
            "interface": "127.0.0.1",
            "publish_port": publish_port,
            "ret_port": ret_port,
            "auto_accept": True,
            "user": user,
            "log_file": str(home / "master.log"),
            "log_level_logfile": "warning",
        },
    )
    minions = [f"host-{n}" for n in range(1, max(sizes) + 1)]
    for minion in minions:
        write_config(
            home / minion / "minion",
            {
                "id": minion,
                "root_dir": str(home / minion / "root"),
                "master": "127.0.0.1",
                "master_port": ret_port,
                "publish_port": publish_port,
                "user": user,
                "log_file": str(home / minion / "minion.log"),
                "log_level_logfile": "warning",
                "enable_fqdns_grains": False,
            },
        )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    daemons: list[subprocess.Popen] = []
    try:
        master = spawn(
            [str(bin_dir / "salt-master"), "-c", str(home)], env=env, log=home / "master.out"
        )
        daemons.append(master)

        def master_up() -> bool:
            if master.poll() is not None:
                said = (home / "master.out").read_text()[-2000:]
                raise Unavailable(f"salt-master exited {master.returncode}: {said}")
            return accepting(ret_port)

        wait_for(master_up, timeout=120, interval=0.2, what="salt-master's ret_port")
        for minion in minions:
            daemons.append(
                spawn(
                    [str(bin_dir / "salt-minion"), "-c", str(home / minion)],
                    env=env,
                    log=home / minion / "minion.out",
                )
            )
        argv = [str(bin_dir / "python"), str(HERE / "salt_calls.py"), "--config"]
        argv += [str(home / "master"), "--minions", ",".join(minions)]
        argv += ["--sizes", ",".join(map(str, sizes)), "--rounds", str(rounds)]
        argv += ["--warmup", str(warmup)]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"salt_calls.py exited {done.returncode}: {done.stderr[-3000:]}")
        found = json.loads(done.stdout.strip().splitlines()[-1])
        api_series.rounds = {int(size): ms for size, ms in found["rounds"].items()}
        for size in sizes:
            cli = [str(bin_dir / "salt"), "-c", str(home), "-L", ",".join(minions[:size])]
            cli += ["cmd.retcode", '"true"', "--out=json", "--static"]
            for _ in range(warmup):
                cli_round(cli, env, tmp, minions[:size])
            cli_series.rounds[size] = [
                cli_round(cli, env, tmp, minions[:size]) for _ in range(rounds)
            ]
    finally:
        stop_groups(daemons)
    return [api_series, cli_series]


def cli_round(argv: list[str], env: dict[str, str], cwd: Path, minions: list[str]) -> float:
    spent, output = timed_process(argv, env=env, cwd=cwd)
    answers = json.loads(output)
    if sorted(answers) != sorted(minions) or any(code != 0 for code in answers.values()):
        raise RuntimeError(f"salt cmd.retcode answered {answers}")
    return spent
