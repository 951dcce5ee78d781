"""What the three sides share: each tool's own virtualenv (built once from its pinned
requirements, kept under `bench/peers/.venvs/`), stopping whole process groups, and the
shape of a measurement."""

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
STAMP = ".tether-peers-stamp"


class Unavailable(Exception):
    """A tool that cannot be installed or started here; the message says why, verbatim."""


@dataclass
class Series:
    """One way of running one tool: per fleet size, the wall time of each round, in ms."""

    label: str
    rounds: dict[int, list[float]] = field(default_factory=dict)


def venv(name: str) -> Path:
    """The `bin` directory of the tool's virtualenv, created (or re-created when its
    requirements changed) from `requirements-NAME.txt`: every package pinned exactly, so two
    machines compare the same releases."""
    requirements = HERE / f"requirements-{name}.txt"
    home = VENVS / name
    wanted = hashlib.sha256(requirements.read_bytes() + sys.version.encode()).hexdigest()
    stamp = home / STAMP
    if stamp.exists() and stamp.read_text() == wanted:
        return home / "bin"
    print(f"installing {name} into {home} (once; cached there)", flush=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(home)],
        [str(home / "bin" / "pip"), "install", "-q", "-r", str(requirements)],
    ]
    for argv in steps:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"`{' '.join(argv)}` still running after {exc.timeout} s") from None
        if done.returncode != 0:
            said = [
                line
                for line in (done.stdout + done.stderr).splitlines()
                if not line.startswith("WARNING: Location")  # pip's note on absent mirrors
            ]
            raise Unavailable(f"`{' '.join(argv)}` failed: " + "\n".join(said[-15:]))
    stamp.write_text(wanted)
    return home / "bin"


def stop_groups(procs: list[subprocess.Popen], grace: float = 15) -> None:
    """TERM to each process's whole group (a daemon and the workers it forked), all at once;
    then KILL to whatever of a group is left once its leader has exited or the grace has run
    out."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def elapsed_ms(action: Callable[[], object]) -> float:
    """Wall time of `action`, in ms; `action` checks its own result and raises if wrong."""
    began = time.perf_counter()
    action()
    return (time.perf_counter() - began) * 1000


def timed_process(argv: list[str], *, env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """Wall time of a command as an operator types it (interpreter start-up included), and
    its output; a failure raises with what it printed."""
    began = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    spent = (time.perf_counter() - began) * 1000
    if done.returncode != 0:
        said = done.stdout[-2000:] + done.stderr[-2000:]
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{said}")
    return spent, done.stdout
