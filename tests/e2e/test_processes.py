"""Several server processes, one fleet: two `tether serve` on one PostgreSQL, a real agent
behind a forwarder that stands in for the load balancer.

A command sent through A reaches the agent held by B at once (PostgreSQL LISTEN/NOTIFY: the
poll hub's periodic query is set far beyond the deadline, so only a notification can make
it); its output streams over SSE from A while B receives it; when B dies the agent goes on
through A, and nothing of the output is lost or doubled.
"""

import contextlib
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import (
    ADMIN_PASSWORD,
    AgentProcess,
    Api,
    TetherServer,
    fresh_database_url,
    wait_for,
)
from tests.e2e.test_streaming import read_events
from tests.pgcluster import PgCluster, find_bin_dir
from tether.fleet import credentials

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    """The suite's PostgreSQL under `make test-pg`, else a throwaway cluster of our own."""
    url = os.environ.get("TETHER_DATABASE_URL")
    if url:
        yield url
        return
    if find_bin_dir() is None:
        pytest.fail("PostgreSQL >= 15 is needed (initdb/pg_ctl): .ci/run installs it")
    with PgCluster() as cluster:
        yield cluster.url


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """An empty database of the test's own."""
    own = None if pg_server == os.environ.get("TETHER_DATABASE_URL") else pg_server
    url = fresh_database_url(own)
    assert url is not None
    return url


class Forwarder:
    """A TCP forwarder on loopback: each connection goes to the first backend that accepts
    it, as a load balancer's health check would choose. Remembers which one took each."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.chosen: list[int] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        for port in self.backends:
            with contextlib.suppress(OSError):
                upstream = socket.create_connection(("127.0.0.1", port), timeout=2)
                upstream.settimeout(None)
                break
        else:
            client.close()
            return
        self.chosen.append(port)
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(source, target), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    for sock in (source, target):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_two_processes_serve_one_fleet(pg_url: str, tmp_path: Path) -> None:
    # No periodic query within the test's deadlines: only a notification wakes a poll.
    env = {"TETHER_DATABASE_URL": pg_url, "TETHER_POLL_RECHECK": "30"}
    a = TetherServer(tmp_path / "a", env).setup().start()
    (tmp_path / "b").mkdir()
    b = TetherServer(tmp_path / "b", env).start()
    forwarder = Forwarder([b.port, a.port])
    api = a.login("admin", ADMIN_PASSWORD)
    status, server = api.post("/api/servers/", {"name": "web-1", "host": "127.0.0.1"})
    assert status == 201, server
    state = Path(tempfile.mkdtemp(prefix="agent-", dir=tmp_path))
    agent = AgentProcess(SimpleNamespace(url=forwarder.url), server["server_token"], state)
    agent.start()
    try:

        def online() -> int | None:
            _, body = api.get(f"/api/agents/?server={server['id']}")
            return next((x["id"] for x in body["results"] if x["status"] == "online"), None)

        agent_id = wait_for(online, timeout=30, what="agent online")
        assert set(forwarder.chosen) == {b.port}, "the agent should be talking to B"

        # 1. Sent through A, taken from B's held poll at once.
        status, command = api.post(f"/api/agents/{agent_id}/send_command/", {"command": "true"})
        assert status == 201, command
        done = wait_for(
            lambda: (c := api.get(f"/api/commands/{command['id']}/")[1])["finished_at"] and c,
            timeout=10,
            what="the first command final",
        )
        assert done["status"] == "succeeded", done
        assert seconds(done["delivered_at"]) - seconds(done["created_at"]) < 1.0, done

        # 2. Output streams live over SSE from A while the agent reports to B; then B dies
        #    mid-command and the agent carries on through A.
        lines = 40
        script = f"for i in $(seq 1 {lines}); do echo line-$i; sleep 0.1; done"
        status, command = api.post(f"/api/agents/{agent_id}/send_command/", {"command": script})
        assert status == 201, command
        fleet = SimpleNamespace(server=a, api=api)
        streamed, final, killed_b = "", None, False
        for event, data, _ in read_events(fleet, command["id"], until=60):
            if event == "output":
                assert data["stream"] == "stdout"
                streamed += data["data"]
                if not killed_b and streamed.count("\n") >= 5:
                    b.kill(signal.SIGKILL)
                    killed_b = True
            if event == "end":
                final = data
                break
        assert killed_b, "no output streamed from A before the command ended"
        assert final is not None and final["status"] == "succeeded", final
        expected = "".join(f"line-{i}\n" for i in range(1, lines + 1))
        assert streamed == expected  # nothing lost, nothing doubled, in order
        stored = api.get(f"/api/commands/{command['id']}/")[1]
        assert stored["stdout"] == expected
        assert forwarder.chosen[-1] == a.port, "the agent should have gone on through A"

        # 3. And the fleet goes on: the agent, now held by A, still gets its work.
        status, command = api.post(f"/api/agents/{agent_id}/send_command/", {"command": "true"})
        started = time.monotonic()
        wait_for(
            lambda: api.get(f"/api/commands/{command['id']}/")[1]["status"] == "succeeded",
            timeout=10,
            what="a command after B died",
        )
        assert time.monotonic() - started < 5
    finally:
        agent.kill(signal.SIGTERM)
        forwarder.close()
        a.kill(signal.SIGTERM)
        if b.proc and b.proc.poll() is None:
            b.kill(signal.SIGTERM)


def test_workers_refuse_sqlite(tmp_path: Path) -> None:
    """`--workers` above 1 is for PostgreSQL: on SQLite it says so instead of starting."""
    server = TetherServer(tmp_path / "data", {"TETHER_DATABASE_URL": ""})
    server.env.pop("TETHER_DATABASE_URL")
    with pytest.raises(Exception) as refused:
        server.cli("serve", "--workers", "2", "--bind", f"127.0.0.1:{server.port}")
    assert "needs PostgreSQL" in refused.value.stderr


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid and stat[0] != "Z":
                    found.add(int(entry.name))
    return found


def server_processes(pid: int) -> set[int]:
    """The supervisor's server processes (spawn also starts a resource tracker: not one)."""
    found = set()
    for child in children(pid):
        with contextlib.suppress(OSError):  # one that ended since it was listed
            if "resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes().decode():
                found.add(child)
    return found


def test_workers_run_several_processes_on_one_port(pg_url: str, tmp_path: Path) -> None:
    """`tether serve --workers 2`: two processes answer on one port; one that dies is
    started again; SIGTERM stops them all."""
    server = TetherServer(tmp_path / "data", {"TETHER_DATABASE_URL": pg_url}).setup()
    server.start("--workers", "2")
    assert server.proc is not None
    first = wait_for(
        lambda: len(p := server_processes(server.proc.pid)) == 2 and p,
        timeout=30,
        what="two server processes",
    )
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    again = wait_for(
        lambda: len(p := server_processes(server.proc.pid)) == 2 and victim not in p and p,
        timeout=30,
        what="the dead process replaced",
    )
    assert Api(server.url).get("/healthz")[0] == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in again)


def test_a_request_replayed_to_another_process_is_refused(pg_url: str, tmp_path: Path) -> None:
    """The nonce of a signed request is shared by every process (issue 13, row 6): a poll
    captured on its way to A and replayed to B, once work is queued, takes nothing."""
    env = {"TETHER_DATABASE_URL": pg_url, "TETHER_SECRET_KEY": "k" * 50}
    a = TetherServer(tmp_path / "a", env).setup().start()
    (tmp_path / "b").mkdir()
    b = TetherServer(tmp_path / "b", env).start()
    try:
        admin = a.login("admin", ADMIN_PASSWORD)
        _, server = admin.post("/api/servers/", {"name": "replayed", "host": "127.0.0.1"})
        status, reg = Api(a.url).post(
            "/api/agents/register/",
            {"server_token": server["server_token"], "hostname": "r", "signing": "hmac-sha256"},
        )
        assert status == 201, reg
        path = "/api/agents/poll_commands/?wait=0"
        stamp, nonce = str(int(time.time())), os.urandom(16).hex()
        headers = {
            "X-Agent-Token": reg["token"],
            "X-Tether-Timestamp": stamp,
            "X-Tether-Nonce": nonce,
            "X-Tether-Signature": credentials.sign(
                reg["secret_key"], "GET", path, stamp, b"", nonce
            ),
        }
        status, first = Api(a.url, headers).get(path)
        assert status == 200, first
        status, queued = admin.post(
            f"/api/agents/{reg['agent_id']}/send_command/", {"command": "true"}
        )
        assert status == 201, queued

        status, replay = Api(b.url, headers).get(path)

        assert status == 401, replay
        assert replay["error"]["code"] == "replayed"
        _, command = admin.get(f"/api/commands/{queued['id']}/")
        assert command["status"] == "queued"
    finally:
        b.kill(signal.SIGTERM)
        a.kill(signal.SIGTERM)
