"""The fault suite's fixtures: a server whose fleet timers make faults resolve in seconds, a
TCP proxy the test controls, and the ledger of what the suite compared (printed at the end).

Every fault runs real processes: `tether serve` under uvicorn and `agent/main.py`."""

import contextlib
import errno
import importlib.util
import os
import resource
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.conftest import (
    ADMIN_PASSWORD,
    AGENT,
    AgentProcess,
    Api,
    Fleet,
    TetherServer,
    wait_for,
)

# Lease and long poll short enough that "longer than the lease" takes seconds; offline after
# 3 x 1 s without a heartbeat, lost 1 s later (FAST_ENV).
FAULT_ENV = {"TETHER_COMMAND_LEASE": "2", "TETHER_LONG_POLL_TIMEOUT": "5"}

# What the suite checked, for the summary: faults survived, bytes compared, double runs seen.
LEDGER = {"faults": 0, "bytes_compared": 0, "double_runs": 0}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if LEDGER["faults"]:
        terminalreporter.write_line(
            "fault suite: {faults} faults run, {bytes_compared} bytes compared, "
            "{double_runs} double runs seen".format(**LEDGER)
        )


def stored_output(server: TetherServer, command_id: int, stream: str = "stdout") -> bytes:
    """The bytes the server stores for one stream, read from its chunks; fails if two chunks
    overlap or leave a hole (a byte stored twice, or one lost between them)."""
    rows = server.sql(
        'SELECT "offset", data FROM commands_outputchunk WHERE command_id = ? AND stream = ? '
        'ORDER BY "offset"',
        command_id,
        stream,
    )
    data = b""
    for offset, chunk in rows:
        assert offset == len(data), f"{stream} chunk at {offset}, stored end {len(data)}"
        data += bytes(chunk)
    return data


def stored_runs(server: TetherServer, command_id: int, stream: str = "stdout") -> list:
    """The stored bytes of one stream as [(offset, bytes)], one item per stretch between the
    holes the agent declared; fails if two chunks overlap (a byte stored twice)."""
    rows = server.sql(
        'SELECT "offset", data FROM commands_outputchunk WHERE command_id = ? AND stream = ? '
        'ORDER BY "offset"',
        command_id,
        stream,
    )
    runs: list[tuple[int, bytes]] = []
    for offset, chunk in rows:
        end = runs[-1][0] + len(runs[-1][1]) if runs else 0
        assert offset >= end, f"{stream} chunk at {offset} overlaps the stored end {end}"
        if runs and offset == end:
            runs[-1] = (runs[-1][0], runs[-1][1] + bytes(chunk))
        else:
            runs.append((offset, bytes(chunk)))
    return runs


def assert_output(server: TetherServer, command_id: int, expected: bytes, stream: str = "stdout"):
    """The stream's stored bytes are exactly `expected`: nothing lost, nothing doubled."""
    got = stored_output(server, command_id, stream)
    assert got == expected, f"{stream}: {len(got)} bytes stored, {len(expected)} expected"
    LEDGER["bytes_compared"] += len(expected)


def runs(marker: Path) -> int:
    """How many times a command ran, from the line each run appends to `marker`."""
    count = marker.read_text().count("run\n") if marker.exists() else 0
    if count > 1:
        LEDGER["double_runs"] += 1
    return count


def numbered(prefix: str, first: int, last: int) -> bytes:
    return "".join(f"{prefix}-{i}\n" for i in range(first, last + 1)).encode()


def gated(marker: Path, parts: list[tuple[str, int]], gates: list[Path]) -> str:
    """A shell command that appends "run" to `marker`, then prints the numbered lines of each
    part, waiting for the gate file before each part after the first (and saying so with
    `<gate>.reached`): the test decides when the command moves on (the command waits on a
    file, the test on a condition)."""
    script = [f"echo run >> {marker}"]
    for index, (prefix, count) in enumerate(parts):
        if index:
            gate = gates[index - 1]
            script.append(f"touch {gate}.reached; while [ ! -e {gate} ]; do sleep 0.02; done")
        script.append(f"for i in $(seq 1 {count}); do echo {prefix}-$i; done")
    return "; ".join(script)


def fault_survived() -> None:
    LEDGER["faults"] += 1


def agent_module() -> ModuleType:
    """agent/main.py imported: its own client, signing and identity, for faults sent by hand."""
    spec = importlib.util.spec_from_file_location("tether_agent_under_test", AGENT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def register_by_hand(server: TetherServer, api: Api, state_dir: Path) -> dict:
    """Register an agent as agent/main.py would and leave its credentials in `state_dir`: an
    agent later started there is that agent, and has never polled."""
    agent = agent_module()
    _, host = api.post("/api/servers/", {"name": f"h-{uuid.uuid4().hex[:8]}", "host": "127.0.0.1"})
    state_dir.mkdir(parents=True, exist_ok=True)
    machine_id, instance_id = agent.machine_identity(str(state_dir))
    status, reg = Api(server.url).post(
        "/api/agents/register/",
        {
            "server_token": host["server_token"],
            "hostname": "by-hand",
            "version": agent.__version__,
            "signing": "hmac-sha256",
            "machine_id": machine_id,
            "instance_id": instance_id,
        },
    )
    assert status == 201, reg
    creds = {k: reg[k] for k in ("agent_id", "server_id", "token", "secret_key")}
    agent.save_credentials(str(state_dir), {**creds, "server": server.url})
    return {**reg, "server_token": host["server_token"]}


STOP_SECONDS = 40
STOP_TEST = "test_a_server_stopped_for_40_s_comes_back_with_every_byte_and_no_double_run"
STOP_LINES = 2000


@pytest.fixture(autouse=True)
def _stop_the_server_early(request: pytest.FixtureRequest) -> None:
    """The 40 s SIGSTOP is the one slow fault: when its test is to run, the stop begins before
    the first fault, and the others run meanwhile (its test, collected last, ends it)."""
    if any(item.name == STOP_TEST for item in request.session.items):
        request.getfixturevalue("stopped_server")


@pytest.fixture(scope="package")
def stopped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A server stopped (SIGSTOP) while its agent streams a command's output, just after a
    second command was sent: what it was doing is frozen mid-way, its sockets stay open."""
    tmp = tmp_path_factory.mktemp("stopped")
    server = TetherServer(tmp / "data", FAULT_ENV).setup().start()
    fleet = Fleet(server, server.login("admin", ADMIN_PASSWORD), tmp)
    start_agent(fleet)
    markers = tmp / "first.txt", tmp / "second.txt"
    first = fleet.send(
        f"echo run >> {markers[0]}; for i in $(seq 1 {STOP_LINES}); do echo line-$i; "
        "[ $((i % 100)) = 0 ] && sleep 0.1; done; true"
    )
    wait_for(
        lambda: stored_output(server, first["id"]).count(b"\n") >= 100,
        what="part of the output stored",
    )
    # A second agent, registered but not yet running, has a command queued: nothing can
    # have handed it out when the server stops.
    state = tmp / "agent-b"
    b = register_by_hand(server, fleet.api, state)
    _, second = fleet.api.post(
        f"/api/agents/{b['agent_id']}/send_command/",
        {"command": f"echo run >> {markers[1]}; echo second"},
    )
    assert second["status"] == "queued", second
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    agent_b = AgentProcess(server, b["server_token"], state, extra=("--no-rpc",)).start()
    stopped = SimpleNamespace(
        server=server,
        fleet=fleet,
        first=first,
        second=second,
        agent_b=agent_b,
        markers=markers,
        stopped_at=stopped_at,
    )
    yield stopped
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGCONT)
    for agent in (fleet.agent_proc, agent_b):
        if agent and agent.proc and agent.proc.poll() is None:
            agent.kill()
    server.kill()


@pytest.fixture(scope="package")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherServer]:
    """One server with short lease and long poll, shared by the faults that do not kill it."""
    server = TetherServer(tmp_path_factory.mktemp("faults"), FAULT_ENV).setup().start()
    yield server
    server.kill()


@pytest.fixture(scope="package")
def fault_api(fault_server: TetherServer) -> Api:
    return fault_server.login("admin", ADMIN_PASSWORD)


@pytest.fixture
def fault_fleet(fault_server: TetherServer, fault_api: Api, tmp_path: Path) -> Iterator[Fleet]:
    """A managed host on the fault server; the test starts its agent as the fault needs."""
    fleet = Fleet(fault_server, fault_api, tmp_path)
    yield fleet
    if fleet.agent_proc and fleet.agent_proc.proc and fleet.agent_proc.proc.poll() is None:
        fleet.agent_proc.kill()


def start_agent(
    fleet: Fleet,
    *,
    url: str | None = None,
    state_dir: Path | None = None,
    agent_file: Path | None = None,
    env: dict[str, str] | None = None,
) -> AgentProcess:
    """A real agent for the fleet's host, reaching the server at `url` (a proxy) if given;
    its log is kept beside its state dir (which a fault may fill)."""
    server = SimpleNamespace(url=url) if url else fleet.server
    state = state_dir or Path(tempfile.mkdtemp(prefix="agent-", dir=fleet.tmp))
    kw: dict[str, Any] = {"extra": ("--no-rpc",), "env": env}
    if agent_file:
        kw["agent_file"] = agent_file
    agent = AgentProcess(server, fleet.server_token, state, **kw)
    agent.log = state.with_name(state.name + ".log")
    fleet.agent_proc = agent.start()
    fleet.agent_id = fleet.wait_online()["id"]
    return fleet.agent_proc


class FaultProxy:
    """A TCP proxy on loopback in front of one server, in one of three modes the test sets:
    `open` forwards both ways; `blackhole` forwards requests but drops every answer (the server
    acts, the agent never hears); `cut` closes every connection and refuses new ones (nothing
    listens on the port). Each change of mode first closes the connections in flight."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.mode = "open"
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.requests: list[str] = []  # the request line of each connection, with its mode
        self.listener: socket.socket | None = None
        self.port = 0
        self._listen()
        self.url = f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.mode == "cut":  # accepted just as the listener closed
                self._close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.backend_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets.update((client, upstream))
            mode = self.mode
            threading.Thread(target=self._pipe, args=(client, upstream, mode, True)).start()
            threading.Thread(target=self._pipe, args=(upstream, client, mode, False)).start()

    def _pipe(self, source: socket.socket, target: socket.socket, mode: str, up: bool) -> None:
        first = True
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if up and first:
                    line = data.split(b"\r\n", 1)[0].decode(errors="replace")
                    self.requests.append(f"{mode} {line}")
                first = False
                if self.mode == "cut":
                    break
                if up or self.mode == "open":
                    target.sendall(data)
        self._close(source, target)

    def _close(self, *socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
            with self.lock:
                self.sockets.discard(sock)

    def _drop_all(self) -> None:
        with self.lock:
            socks = list(self.sockets)
        self._close(*socks)

    def set_mode(self, mode: str) -> None:
        assert mode in ("open", "blackhole", "cut")
        self.mode = mode
        if mode == "cut" and self.listener is not None:
            self.listener.close()
            self.listener = None
        self._drop_all()
        if mode != "cut" and self.listener is None:
            self._listen()  # the same port again

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        self._drop_all()


class SmallDisk:
    """A state dir on a disk the test fills and frees. A 4 MiB tmpfs when the tests may mount
    one (root): filling it makes every write that needs a block fail with ENOSPC. Otherwise the
    agent's own RLIMIT_FSIZE set to 0 (prlimit), and back: every write that grows a file fails
    as on a full disk, with EFBIG (children started meanwhile inherit the limit)."""

    def __init__(self, path: Path, mount: bool = True) -> None:
        path.mkdir()
        self.path = path
        self.filler = path / "filler"
        self.mounted = mount and os.geteuid() == 0 and self._mount()
        self.limited_pid: int | None = None

    def _mount(self) -> bool:
        argv = ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(self.path)]
        return subprocess.run(argv, capture_output=True).returncode == 0

    @property
    def how(self) -> str:
        return "tmpfs filled (ENOSPC)" if self.mounted else "RLIMIT_FSIZE 0 (EFBIG)"

    def fill(self, pid: int) -> None:
        if not self.mounted:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
            self.limited_pid = pid
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)

    def free(self) -> None:
        if self.limited_pid is not None:
            limits = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            resource.prlimit(self.limited_pid, resource.RLIMIT_FSIZE, limits)
            self.limited_pid = None
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
