"""End-to-end fixtures: a real `tether serve` (uvicorn; SQLite, or a PostgreSQL database of its
own when TETHER_DATABASE_URL is set, as `make test-pg` does) and real agent processes on
loopback. Everything waits on conditions with deadlines, never on fixed sleeps."""

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AGENT = ROOT / "agent" / "main.py"
FINAL = {"succeeded", "failed", "timed_out", "cancelled", "lost"}
ADMIN_PASSWORD = "admin-pw-for-tests"

# Fast fleet timers: the tests turn the clocks down instead of sleeping.
FAST_ENV = {
    "TETHER_HEARTBEAT_INTERVAL": "1",
    "TETHER_POLL_INTERVAL": "1",
    "TETHER_LONG_POLL_TIMEOUT": "10",
    "TETHER_SWEEP_INTERVAL": "0.5",
    "TETHER_LOST_GRACE": "1",
    "TETHER_POLL_RECHECK": "1",
    "TETHER_REGISTER_RATE": "1000/min",
    # The suite logs in, polls and fails on purpose a lot; tests/e2e/test_throttles.py runs
    # a server with the real defaults.
    "TETHER_LOGIN_RATE": "1000/min",
    "TETHER_LOGIN_ADDRESS_RATE": "1000/min",
    "TETHER_AGENT_AUTH_FAIL_RATE": "1000/min",
    "TETHER_POLL_RATE": "6000/min",
}

_processes: list[subprocess.Popen] = []
_databases: list[str] = []


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(argv: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("ab")
    proc = subprocess.Popen(
        argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
    )
    _processes.append(proc)
    return proc


def fresh_database_url(server: str | None = None) -> str | None:
    """A new, empty PostgreSQL database on the server of TETHER_DATABASE_URL (None on SQLite):
    each server process of the suite gets its own, as each gets its own SQLite file. With
    `server`, on that one instead (the caller's own cluster, which goes with its databases)."""
    base = server or os.environ.get("TETHER_DATABASE_URL")
    if not base:
        return None
    import psycopg

    name = f"e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    if server is None:
        _databases.append(name)
    return urlunsplit(urlsplit(base)._replace(path=f"/{name}"))


def database_label() -> str:
    """Which backend the servers of this run use, for what tests and benchmarks print."""
    return "PostgreSQL" if os.environ.get("TETHER_DATABASE_URL") else "SQLite (WAL)"


class Database:
    """A test's own connection to a server's database, on either backend, in autocommit: the
    tests write their SQL once, with `?` placeholders, and read rows as tuples (timestamps come
    back as text from SQLite, as datetimes from PostgreSQL)."""

    def __init__(self, url: str | None, sqlite_file: Path) -> None:
        self.postgres = bool(url)
        if url:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)
        else:
            self.conn = sqlite3.connect(sqlite_file, timeout=20, isolation_level=None)

    def execute(self, query: str, params: Sequence[Any] = ()) -> Any:
        if self.postgres:
            return self.conn.execute(query.replace("%", "%%").replace("?", "%s"), tuple(params))
        return self.conn.execute(query, [_as_sqlite(value) for value in params])

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _as_sqlite(value: Any) -> Any:
    # Django keeps datetimes in SQLite as naive UTC text; an aware one compares right only so.
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ")
    return value


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)


@pytest.fixture(autouse=True)
def _database_work_in_the_test_thread(settings: Any) -> None:
    """In-process tests run inside a transaction on the test's own connection; the server's
    database thread pool would not see their rows (e2e servers keep the pool)."""
    settings.DB_THREADS = 0


@pytest.fixture(autouse=True)
def _fresh_agent_caches() -> Iterator[None]:
    """Each test rolls the database back; what the process remembers of agents (their
    credentials, which have work) must not outlive it."""
    from django.core.cache import cache
    from django.core.cache.backends.locmem import LocMemCache

    from tether.commands import holding
    from tether.commands.poll import hub
    from tether.fleet import guard, heartbeats, nonces
    from tether.fleet.authentication import clear_cache

    clear_cache()
    nonces.forget_all()
    guard.forget_all()
    if isinstance(cache, LocMemCache):  # what the throttles counted (on PostgreSQL: rolled back)
        cache.clear()
    hub.resync()
    hub.work.clear()
    heartbeats.discard()
    holding.discard()
    yield
    clear_cache()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    for proc in _processes:
        if proc.poll() is None:
            kill_group(proc)
    if _databases:
        # On a long-lived PostgreSQL (not `make test-pg`'s throwaway one) nothing piles up.
        import psycopg

        with psycopg.connect(os.environ["TETHER_DATABASE_URL"], autocommit=True) as conn:
            for name in _databases:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Api:
    """A tiny JSON client over urllib: the tests speak HTTP exactly as a user would."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        self.base = base.rstrip("/")
        self.headers = headers or {}

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        timeout: float = 30,
    ) -> tuple[int, Any]:
        data = raw
        h = {**self.headers, **(headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", path, {} if body is None and "raw" not in kw else body, **kw)


def _decode(payload: bytes) -> Any:
    try:
        return json.loads(payload or b"null")
    except ValueError:
        return payload


_SQLITE_TEMPLATE: list[Path] = []


def _migrated_sqlite() -> Path:
    """A SQLite database migrated, with the admin, made on first use in this session."""
    if not _SQLITE_TEMPLATE:
        data_dir = Path(tempfile.mkdtemp(prefix="tether-template-"))
        atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
        TetherServer(data_dir, {"TETHER_DATABASE_URL": ""})._migrate()
        path = data_dir / "tether.sqlite3"
        with sqlite3.connect(path) as conn:  # the whole database in the one file
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _SQLITE_TEMPLATE.append(path)
    return _SQLITE_TEMPLATE[0]


_PG_TEMPLATE: list[str] = []


def _copy_pg_template(url: str) -> bool:
    """Make `url`'s database (fresh_database_url's, still empty) a copy of a template
    migrated once per session; False when it is not one of the suite's own databases."""
    base = os.environ.get("TETHER_DATABASE_URL")
    target = urlsplit(url)
    name = target.path.lstrip("/")
    if not base or not name.startswith("e2e_") or urlsplit(base).netloc != target.netloc:
        return False
    import psycopg

    if not _PG_TEMPLATE:
        template_url = fresh_database_url()
        assert template_url is not None
        data_dir = Path(tempfile.mkdtemp(prefix="tether-template-"))
        atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
        TetherServer(data_dir, {"TETHER_DATABASE_URL": template_url})._migrate()
        _PG_TEMPLATE.append(urlsplit(template_url).path.lstrip("/"))
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name}")
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {_PG_TEMPLATE[0]}")
    return True


class TetherServer:
    """One `tether serve` process on a data dir it owns; can be killed and restarted."""

    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **FAST_ENV,
            "TETHER_DATA_DIR": str(data_dir),
            "TETHER_SECRET_KEY": "tests-" + "k" * 50,
            "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD,
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        if "TETHER_DATABASE_URL" not in (extra_env or {}) and (url := fresh_database_url()):
            self.env["TETHER_DATABASE_URL"] = url
        self.log = data_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "tether"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=True,
        )

    def setup(self) -> "TetherServer":
        """Migrate and make the admin. A database migrated once per session is copied
        instead (two interpreter starts and every migration, for each server): a SQLite file,
        or on the suite's PostgreSQL a template database."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url = self.env.get("TETHER_DATABASE_URL")
        if url and not _copy_pg_template(url):
            self._migrate()
        elif not url:
            shutil.copyfile(_migrated_sqlite(), self.data_dir / "tether.sqlite3")
        return self

    def _migrate(self) -> None:
        self.cli("migrate", "--noinput", "-v0")
        self.cli(
            "createsuperuser", "--noinput", "--username", "admin", "--email", "admin@example.com"
        )

    def start(self, *args: str) -> "TetherServer":
        self.proc = spawn(
            [str(BIN / "tether"), "serve", "--bind", f"127.0.0.1:{self.port}", *args],
            env=self.env,
            log=self.log,
        )

        def healthy() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            with contextlib.suppress(OSError):
                return Api(self.url).get("/healthz", timeout=2)[0] == 200
            return False

        wait_for(healthy, timeout=40, interval=0.1, what="server /healthz")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        kill_group(self.proc, sig)

    def login(self, username: str, password: str) -> Api:
        status, body = Api(self.url).post(
            "/api/auth/token/", {"username": username, "password": password}
        )
        assert status == 200, body
        return Api(self.url, {"Authorization": f"Token {body['token']}"})

    def create_user(self, username: str, password: str) -> Api:
        self.cli(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model as g; "
            f"g().objects.create_user({username!r}, password={password!r})",
        )
        return self.login(username, password)

    def db(self) -> Database:
        """A connection of the test's own to this server's database (close it, or use `with`)."""
        return Database(self.env.get("TETHER_DATABASE_URL"), self.data_dir / "tether.sqlite3")

    def sql(self, query: str, *params: Any) -> list[tuple]:
        """One statement, `?` placeholders, committed at once; the rows it returns, if any."""
        with self.db() as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []


class AgentProcess:
    """A real `agent/main.py` with its own state dir, started as the README says: it serves
    its RPC endpoint, as shipped (measured: no cost to the suite); `extra=("--no-rpc",)` for
    none."""

    def __init__(
        self,
        server: TetherServer,
        server_token: str,
        state_dir: Path,
        agent_file: Path = AGENT,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.server = server
        self.env = env or {}
        self.server_token = server_token
        self.state_dir = state_dir
        self.agent_file = agent_file
        self.extra = extra
        self.log = state_dir / "agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AgentProcess":
        self.proc = spawn(
            [
                sys.executable,
                str(self.agent_file),
                "--server",
                self.server.url,
                "--server-token",
                self.server_token,
                "--state-dir",
                str(self.state_dir),
                "--kill-grace",
                "1",
                *self.extra,
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            log=self.log,
        )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        # Only the agent's own process: its commands run in sessions of their own.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=15)


class Fleet:
    """One user's view of a server: a managed host with a running agent."""

    def __init__(self, server: TetherServer, api: Api, tmp: Path) -> None:
        self.server = server
        self.api = api
        self.tmp = tmp
        status, body = api.post(
            "/api/servers/", {"name": f"host-{uuid.uuid4().hex[:8]}", "host": "127.0.0.1"}
        )
        assert status == 201, body
        self.server_id = body["id"]
        self.server_token = body["server_token"]
        self.agent_proc: AgentProcess | None = None
        self.agent_id: int | None = None

    def start_agent(self, **kw: Any) -> int:
        state = Path(tempfile.mkdtemp(prefix="agent-", dir=self.tmp))
        self.agent_proc = AgentProcess(self.server, self.server_token, state, **kw).start()
        self.agent_id = self.wait_online()["id"]
        return self.agent_id

    def wait_online(self, timeout: float = 30) -> dict:
        def online() -> dict | None:
            _, body = self.api.get(f"/api/agents/?server={self.server_id}")
            for agent in body["results"]:
                if agent["status"] == "online":
                    return agent
            return None

        return wait_for(online, timeout=timeout, what="agent online")

    def send(self, command: str, **fields: Any) -> dict:
        return self.send_to(self.agent_id, command, **fields)

    def send_to(self, agent_id: int, command: str, **fields: Any) -> dict:
        status, body = self.api.post(
            f"/api/agents/{agent_id}/send_command/", {"command": command, **fields}
        )
        assert status == 201, body
        return body

    def command(self, command_id: int) -> dict:
        status, body = self.api.get(f"/api/commands/{command_id}/")
        assert status == 200, body
        return body

    def wait_final(self, command_id: int, timeout: float = 30) -> dict:
        return wait_for(
            lambda: (c := self.command(command_id))["status"] in FINAL and c,
            timeout=timeout,
            what=f"command {command_id} final",
        )

    def run(self, command: str, wait: float = 30, **fields: Any) -> dict:
        return self.wait_final(self.send(command, **fields)["id"], timeout=wait)


@pytest.fixture(scope="session")
def tether(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherServer]:
    server = TetherServer(tmp_path_factory.mktemp("tether")).setup().start()
    yield server
    server.kill(signal.SIGTERM)


@pytest.fixture(scope="session")
def admin_api(tether: TetherServer) -> Api:
    return tether.login("admin", ADMIN_PASSWORD)


@pytest.fixture
def fleet(tether: TetherServer, admin_api: Api, tmp_path: Path) -> Iterator[Fleet]:
    """A fresh managed host with a running, online agent."""
    f = Fleet(tether, admin_api, tmp_path)
    f.start_agent()
    yield f
    if f.agent_proc and f.agent_proc.proc and f.agent_proc.proc.poll() is None:
        f.agent_proc.kill(signal.SIGTERM)


def processes_matching(marker: str) -> list[int]:
    """PIDs whose command line contains `marker` (how tests prove a group is gone)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if marker in cmdline and str(os.getpid()) != entry.name:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
    return pids
