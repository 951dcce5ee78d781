"""A throwaway PostgreSQL cluster for the suite and the benchmarks.

The suite runs on SQLite and on PostgreSQL alike; PostgreSQL needs a server, and a shared one
would let runs see each other's rows. So each run gets its own cluster: `initdb` in a fresh
temporary directory, `pg_ctl start` on a free loopback port with durability turned off (a test
database never outlives the run), and everything removed at exit.

Standard library and psycopg only, so that `bench/` scripts can import it too:

    with PgCluster() as cluster:
        os.environ["TETHER_DATABASE_URL"] = cluster.url
"""

import atexit
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

MIN_MAJOR = 15
ROLE = "tether"
DATABASE = "tether"
# PostgreSQL refuses to run as root; when we are root, this unprivileged account runs it.
UNPRIVILEGED_USERS = ("nobody", "tether-test")

# Speed over durability (a crashed test cluster is thrown away anyway). Each `tether serve`
# keeps up to 8 database threads plus its task workers, and a run starts a few dozen servers
# that linger until their test ends: max_connections leaves room for all of them.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "500",
    "shared_buffers": "64MB",
    "timezone": "'UTC'",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %d '",
}


def find_bin_dir(min_major: int = MIN_MAJOR) -> Path | None:
    """The bin directory of the newest PostgreSQL >= `min_major`: the one whose `initdb` is on
    PATH, or Debian's /usr/lib/postgresql/<major>/bin (not on PATH there)."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    found: list[tuple[int, Path]] = []
    for bin_dir in candidates:
        major = _major_version(bin_dir)
        if major is not None and major >= min_major:
            found.append((major, bin_dir))
    return max(found)[1] if found else None


def _major_version(bin_dir: Path) -> int | None:
    initdb = bin_dir / "initdb"
    if not (initdb.exists() and (bin_dir / "pg_ctl").exists()):
        return None
    try:
        out = subprocess.run(
            [str(initdb), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except OSError:
        return None
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match.group(1)) if match else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unprivileged_account() -> tuple[int, int]:
    """uid and gid to run PostgreSQL as when we are root; creates a system user if the usual
    ones are missing (a minimal container may have no `nobody`)."""
    for name in UNPRIVILEGED_USERS:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "tether-test"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    entry = pwd.getpwnam("tether-test")
    return entry.pw_uid, entry.pw_gid


class PgCluster:
    """One private PostgreSQL server: `start()` returns the URL of an empty database owned by
    a role that may create more (pytest-django's `test_*` database, one per e2e server)."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        found = bin_dir or find_bin_dir()
        if found is None:
            raise RuntimeError(
                f"no PostgreSQL >= {MIN_MAJOR} found (initdb on PATH or under "
                "/usr/lib/postgresql/*/bin); install postgresql-15"
            )
        self.bin_dir = found
        self.port = 0
        self.root: Path | None = None
        self._owner: tuple[int, int] | None = None
        self._running = False

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgres://{ROLE}@127.0.0.1:{self.port}/{database}"

    def start(self) -> str:
        self.root = Path(tempfile.mkdtemp(prefix="tether-pg-"))
        atexit.register(self.stop)
        if os.geteuid() == 0:
            self._owner = _unprivileged_account()
            os.chown(self.root, *self._owner)
        self._run(
            "initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/pgcluster.py\n")
            conf.write(f"unix_socket_directories = '{self.root}'\n")
            for key, value in SETTINGS.items():
                conf.write(f"{key} = {value}\n")
        # A port found free may be taken before postgres binds it: try a few.
        for attempt in range(5):
            self.port = _free_port()
            try:
                self._run(
                    "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir),
                    "-l", str(self.log_file), "-o", f"-p {self.port}",
                )  # fmt: skip
                break
            except RuntimeError:
                if attempt == 4 or "already in use" not in self._log_tail():
                    raise
        self._running = True
        self._create_role_and_database()
        return self.url

    def stop(self) -> None:
        """Kill the server (no clean shutdown: nothing in it is worth keeping) and remove it."""
        if self._running:
            self._running = False
            with contextlib.suppress(RuntimeError):
                self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", str(self.data_dir))
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "PgCluster":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _create_role_and_database(self) -> None:
        import psycopg  # only a PostgreSQL run needs it

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN CREATEDB")
            conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")

    def _run(self, program: str, *args: str) -> None:
        argv = [str(self.bin_dir / program), *args]
        kwargs: dict[str, Any] = {}
        if self._owner is not None:
            uid, gid = self._owner
            kwargs = {"user": uid, "group": gid, "extra_groups": []}
        done = subprocess.run(
            argv,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "LC_ALL": "C"},
            **kwargs,
        )
        if done.returncode:
            raise RuntimeError(
                f"{program} failed ({done.returncode}): {done.stderr or done.stdout}"
                f"{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        try:
            return "\n" + self.log_file.read_text()[-2000:]
        except (OSError, AssertionError):
            return ""
