"""The fault suite's fixtures: a server whose fleet timers make faults resolve in seconds, a
TCP proxy the test controls, and the ledger of what the suite compared (printed at the end).

Every fault runs real processes: `tether serve` under uvicorn and `agent/main.py`."""

import contextlib
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import (
    ADMIN_PASSWORD,
    AgentProcess,
    Api,
    Fleet,
    TetherServer,
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
    part, waiting for the gate file before each part after the first: the test decides when
    the command moves on (the command waits on a file, the test on a condition)."""
    script = [f"echo run >> {marker}"]
    for index, (prefix, count) in enumerate(parts):
        if index:
            script.append(f"while [ ! -e {gates[index - 1]} ]; do sleep 0.02; done")
        script.append(f"for i in $(seq 1 {count}); do echo {prefix}-$i; done")
    return "; ".join(script)


def fault_survived() -> None:
    LEDGER["faults"] += 1


@pytest.fixture(scope="session")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherServer]:
    """One server with short lease and long poll, shared by the faults that do not kill it."""
    server = TetherServer(tmp_path_factory.mktemp("faults"), FAULT_ENV).setup().start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
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
    """A real agent for the fleet's host, reaching the server at `url` (a proxy) if given."""
    server = SimpleNamespace(url=url) if url else fleet.server
    state = state_dir or Path(tempfile.mkdtemp(prefix="agent-", dir=fleet.tmp))
    kw: dict[str, Any] = {"extra": ("--no-rpc",), "env": env}
    if agent_file:
        kw["agent_file"] = agent_file
    fleet.agent_proc = AgentProcess(server, fleet.server_token, state, **kw).start()
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
