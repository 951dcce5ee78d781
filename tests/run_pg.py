"""`make test-pg`: the whole suite (or what the arguments select) on a throwaway PostgreSQL.

    python tests/run_pg.py [pytest args...]

Starts a private cluster (tests/pgcluster.py), runs pytest in a child process with
TETHER_DATABASE_URL pointing at it, and removes the cluster whatever the outcome; the exit
status is pytest's.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.pgcluster import PgCluster  # noqa: E402


def main(argv: list[str]) -> int:
    with PgCluster() as cluster:
        print(f"PostgreSQL {cluster.bin_dir.parent.name} on port {cluster.port}", flush=True)
        env = {**os.environ, "TETHER_DATABASE_URL": cluster.url}
        pytest = subprocess.Popen(
            [sys.executable, "-m", "pytest", *argv],
            env=env,
            cwd=ROOT,
            # A shell starts background jobs with SIGINT ignored, and the child would inherit
            # that: pytest must hear the interrupt sent below.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

        # CI cancelling the job (SIGTERM) or ^C: pytest gets an interrupt, so that it stops
        # the servers it started, and the cluster goes after it.
        def interrupt(signum: int, frame: object) -> None:
            pytest.send_signal(signal.SIGINT)

        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
        try:
            return pytest.wait()
        finally:
            if pytest.poll() is None:
                pytest.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
