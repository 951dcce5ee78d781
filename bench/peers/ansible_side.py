"""Ansible ad-hoc over SSH: one real OpenSSH server on loopback (tests/e2e/sshd.py) that the
N inventory hosts (host-1 ... host-N) all reach at 127.0.0.1. Each host has a control socket
of its own (`ansible_control_path`; Ansible's default would name one socket for all N, as
they share address, port and user), so that each is its own SSH connection, as N machines
would be. A round is the command an operator types,

    ansible all -i inventory-N.ini -m command -a true

as a process, until it exits 0 with N hosts CHANGED. Configured as an operator tuning for
speed would: pipelining on, ControlPersist (the control sockets opened by a warm-up round
first), forks >= N, the remote interpreter named (no discovery round trip per host), host
keys checked against a known_hosts file.
"""

import contextlib
import os
import subprocess
from pathlib import Path

from bench.peers.common import Series, timed_process
from tests.e2e.sshd import Sshd

REMOTE_PYTHON = "/usr/bin/python3"


def configure(tmp: Path, sshd: Sshd, sizes: list[int]) -> dict[str, str]:
    """ansible.cfg, known_hosts and one inventory per size; the environment to run in."""
    known_hosts = tmp / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_public_key}\n")
    control = tmp / "cp"
    control.mkdir()
    config = tmp / "ansible.cfg"
    config.write_text(
        "\n".join(
            [
                "[defaults]",
                f"forks = {max(sizes)}",
                "host_key_checking = True",
                f"interpreter_python = {REMOTE_PYTHON}",
                f"private_key_file = {sshd.client_key}",
                "",
                "[ssh_connection]",
                "pipelining = True",
                # Ansible's own ssh_args, with the master kept for the whole bench.
                "ssh_args = -C -o ControlMaster=auto -o ControlPersist=300s "
                f"-o UserKnownHostsFile={known_hosts} -o IdentitiesOnly=yes -o BatchMode=yes",
                "",
            ]
        )
    )
    for size in sizes:
        lines = ["[all]"]
        lines += [f"host-{n} ansible_control_path={control}/host-{n}" for n in range(1, size + 1)]
        lines += ["", "[all:vars]", "ansible_host=127.0.0.1", f"ansible_port={sshd.port}"]
        lines += ["ansible_user=root", ""]
        (tmp / f"inventory-{size}.ini").write_text("\n".join(lines))
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_HOME": str(tmp / "home"),
        "LC_ALL": "C.UTF-8",  # ansible-core refuses a locale that is not UTF-8
    }


def close_masters(control: Path) -> None:
    """Close the ControlPersist masters: ssh detached them from our process group."""
    for socket in control.glob("*"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                ["ssh", "-S", str(socket), "-O", "exit", "peer"], capture_output=True, timeout=10
            )


def one_round(argv: list[str], env: dict[str, str], cwd: Path, size: int) -> float:
    spent, output = timed_process(argv, env=env, cwd=cwd)
    changed = output.count(" | CHANGED | rc=0")
    if changed != size:
        raise RuntimeError(f"{changed} of {size} hosts ran `true`:\n{output[-2000:]}")
    return spent


def measure(sizes: list[int], rounds: int, warmup: int, tmp: Path, bin_dir: Path) -> Series:
    series = Series("Ansible")
    (tmp / "sshd").mkdir()
    # Every host connects at once: sshd's default MaxStartups (10) would drop some.
    sshd = Sshd(tmp / "sshd", settings=("MaxStartups 200",))
    try:
        sshd.start()
        env = configure(tmp, sshd, sizes)
        for size in sizes:
            argv = [str(bin_dir / "ansible"), "all", "-i", str(tmp / f"inventory-{size}.ini")]
            argv += ["-m", "command", "-a", "true"]
            for _ in range(warmup):
                one_round(argv, env, tmp, size)
            series.rounds[size] = [one_round(argv, env, tmp, size) for _ in range(rounds)]
    finally:
        close_masters(tmp / "cp")
        sshd.stop()
    return series
