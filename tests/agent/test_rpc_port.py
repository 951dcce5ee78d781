"""Which port the agent's RPC endpoint takes: on by default, held from the start (so the port
the agent registers with is the one it serves on), its own choice never shared by two agents
on one host and moved to a port the OS picks when taken; the operator's `--rpc-port` taken or
refused, never moved; `--no-rpc` (or `--rpc-port 0`) for none."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent.test_manifest import load_agent
from tests.conftest import AGENT, free_port

agent = load_agent()

SERVER = "http://127.0.0.1:9"


def make_node(state_dir: Path, *flags: str, credentials: dict | None = None):
    """An agent (not started) with `flags`; closed by the `nodes` fixture."""
    state_dir.mkdir(parents=True, exist_ok=True)
    args = agent.parse_args(["--server", SERVER, "--state-dir", str(state_dir), *flags])
    client = agent.Client(args.server, None, args.state_dir)
    client.credentials = credentials or {"token": "0" * 32, "secret_key": "ab" * 32}
    return agent.Agent(args, client, agent.Journal(args.state_dir))


@pytest.fixture
def nodes():
    made: list = []
    yield made
    for node in made:
        if node.rpc is not None:
            node.rpc.close()


@pytest.fixture
def default_port(monkeypatch: pytest.MonkeyPatch) -> int:
    """A DEFAULT_RPC_PORT of the test's own, free now: 7443 may be anyone's on this host."""
    port = free_port()
    monkeypatch.setattr(agent, "DEFAULT_RPC_PORT", port)
    return port


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def held_by_a_listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("0.0.0.0", port))
    sock.listen()
    return sock


def left_in_time_wait() -> int:
    """A port nothing holds but a connection it answered and closed first, as the RPC endpoint
    does after every answer: what a restarted agent finds after a recent status check."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as caller:
            answering, _ = server.accept()
            answering.close()  # the server side closes first: TIME_WAIT is on its port
            caller.recv(1)
    return port


def test_rpc_is_on_unless_turned_off() -> None:
    def rpc_port(*flags: str) -> int | None:
        return agent.parse_args(["--server", SERVER, *flags]).rpc_port

    assert rpc_port() is None  # the agent chooses
    assert rpc_port("--rpc-port", "9000") == 9000
    assert rpc_port("--no-rpc") == 0
    assert rpc_port("--rpc-port", "0") == 0  # what scripts written before the default say


@pytest.mark.parametrize(
    "flags", [("--no-rpc", "--rpc-port", "9000"), ("--rpc-port", "70000"), ("--rpc-port", "-1")]
)
def test_contradicting_or_impossible_rpc_flags_are_refused(flags: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit):
        agent.parse_args(["--server", SERVER, *flags])


def test_an_agent_without_rpc_has_no_endpoint_and_reports_port_zero(
    nodes: list, tmp_path: Path
) -> None:
    node = make_node(tmp_path, "--no-rpc")
    nodes.append(node)

    assert node.rpc is None
    assert node.rpc_port() == 0


def test_the_default_port_is_held_from_the_start_but_nothing_listens_on_it(
    nodes: list, tmp_path: Path, default_port: int
) -> None:
    node = make_node(tmp_path)
    nodes.append(node)

    node.rpc.start()

    assert node.rpc_port() == default_port
    assert not listening(default_port)  # no certificate yet
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("0.0.0.0", default_port))


def test_two_agents_on_one_host_never_share_the_default_port(
    nodes: list, tmp_path: Path, default_port: int, capsys: pytest.CaptureFixture
) -> None:
    first, second = make_node(tmp_path / "a"), make_node(tmp_path / "b")
    nodes.extend([first, second])

    assert first.rpc.take_port() and second.rpc.take_port()  # neither listens yet

    assert first.rpc_port() == default_port
    assert second.rpc_port() not in (0, default_port)
    log = capsys.readouterr().err
    assert "rpc port taken; using a port the OS chose" in log
    assert f"wanted={default_port} port={second.rpc_port()}" in log


def test_a_default_port_another_process_listens_on_is_left_to_it(
    nodes: list, tmp_path: Path, default_port: int
) -> None:
    node = make_node(tmp_path)
    nodes.append(node)
    with held_by_a_listener(default_port):
        assert node.rpc.take_port()

    assert node.rpc_port() not in (0, default_port)


def test_the_port_the_server_knows_is_tried_first(
    nodes: list, tmp_path: Path, default_port: int
) -> None:
    known = free_port()
    node = make_node(
        tmp_path, credentials={"token": "0" * 32, "secret_key": "ab" * 32, "rpc_port": known}
    )
    nodes.append(node)

    assert node.rpc.take_port()

    assert node.rpc_port() == known


def test_registration_reports_the_port_held_and_keeps_the_one_the_server_answers(
    nodes: list, tmp_path: Path, default_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node(tmp_path, credentials={})
    node.args.server_token = "server-token"
    nodes.append(node)
    assert node.rpc.take_port()
    sent = []

    def request(method: str, path: str, body: dict, **kw: object):
        sent.append(body)
        answer = {"agent_id": 3, "token": "1" * 32, "secret_key": "cd" * 32, "rpc_port": 8123}
        return agent.Response(201, answer, {})

    monkeypatch.setattr(node.client, "request", request)

    assert agent.register(node)

    assert sent[0]["rpc_port"] == default_port
    stored = json.loads((tmp_path / "credentials.json").read_text())
    assert stored["rpc_port"] == 8123


def test_the_operators_port_is_taken_over_connections_left_in_time_wait(
    nodes: list, tmp_path: Path
) -> None:
    port = left_in_time_wait()
    with socket.socket() as exclusive, pytest.raises(OSError):
        exclusive.bind(("0.0.0.0", port))  # what the agent's own choice would run into
    node = make_node(tmp_path, "--rpc-port", str(port))
    nodes.append(node)

    assert node.rpc.take_port()

    assert node.rpc_port() == port


def test_the_operators_port_is_never_moved(nodes: list, tmp_path: Path) -> None:
    port = free_port()
    node = make_node(tmp_path, "--rpc-port", str(port))
    nodes.append(node)
    with held_by_a_listener(port):
        assert not node.rpc.take_port()

    assert node.rpc_port() == 0


def test_an_agent_whose_rpc_port_is_taken_stops_at_once_and_says_why(tmp_path: Path) -> None:
    port = free_port()
    with held_by_a_listener(port):
        done = subprocess.run(
            [
                sys.executable,
                str(AGENT),
                *("--server", SERVER, "--server-token", "t", "--state-dir", str(tmp_path)),
                *("--rpc-port", str(port)),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert done.returncode == 2
    assert "cannot take the rpc port" in done.stderr
    assert "--rpc-port is taken; choose another, or run with --no-rpc" in done.stderr
    assert not (tmp_path / "credentials.json").exists()  # it never registered
