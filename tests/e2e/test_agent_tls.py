"""The agent against `tether serve --tls`: it verifies the server with the CA it was given, or
with the one it pinned at registration, and refuses a server that another CA vouches for before
it sends anything. Real servers, real agent processes."""

import signal
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.agent.test_rpc import Ca
from tests.conftest import (
    ADMIN_PASSWORD,
    BIN,
    AgentProcess,
    Api,
    Fleet,
    TetherServer,
    spawn,
    wait_for,
)

pytestmark = pytest.mark.e2e

VERIFY_FAILED = "certificate verify failed"

# The tests' own trust in the servers they start: each server's CA is added once it exists.
TRUST = ssl.create_default_context()
_trusted: set[str] = set()


@pytest.fixture(scope="module", autouse=True)
def _https_for_the_tests_api() -> Iterator[None]:
    """conftest's Api goes through urllib's global opener: let it trust the test CAs."""
    handler = urllib.request.HTTPSHandler(context=TRUST)
    urllib.request.install_opener(urllib.request.build_opener(handler))
    yield
    urllib.request.install_opener(None)


class TlsTetherServer(TetherServer):
    """`tether serve --tls`: HTTPS with a certificate from the server's CA (its own, in
    TETHER_DATA_DIR/ca, or the operator's TETHER_CA_CERT/TETHER_CA_KEY)."""

    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(data_dir, extra_env)
        self.url = f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return Path(self.env.get("TETHER_CA_CERT") or self.data_dir / "ca" / "ca.crt")

    def start(self) -> "TlsTetherServer":
        self.proc = spawn(
            [str(BIN / "tether"), "serve", "--tls", "--bind", f"127.0.0.1:{self.port}"],
            env=self.env,
            log=self.log,
        )

        def healthy() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            if not self.ca_file.exists():
                return False
            if str(self.ca_file) not in _trusted:
                TRUST.load_verify_locations(cafile=str(self.ca_file))
                _trusted.add(str(self.ca_file))
            try:
                return Api(self.url).get("/healthz", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(healthy, timeout=40, interval=0.1, what="server /healthz over https")
        return self


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsTetherServer]:
    server = TlsTetherServer(tmp_path_factory.mktemp("tether-tls")).setup().start()
    yield server
    server.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def impostor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsTetherServer]:
    """A server whose certificate comes from a CA of its own, unknown to the agents."""
    data_dir = tmp_path_factory.mktemp("tether-impostor")
    ca = Ca("Impostor CA")
    cert, key = data_dir / "other-ca.crt", data_dir / "other-ca.key"
    cert.write_text(ca.pem)
    key.write_bytes(
        ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    env = {"TETHER_CA_CERT": str(cert), "TETHER_CA_KEY": str(key)}
    server = TlsTetherServer(data_dir, env).setup().start()
    yield server
    server.kill(signal.SIGTERM)


def fleet_on(server: TlsTetherServer, tmp_path: Path) -> Fleet:
    return Fleet(server, server.login("admin", ADMIN_PASSWORD), tmp_path)


def log_since(agent: AgentProcess, offset: int) -> str:
    return agent.log.read_text()[offset:] if agent.log.exists() else ""


def test_an_agent_given_the_ca_registers_and_runs_commands(
    tls_server: TlsTetherServer, tmp_path: Path
) -> None:
    fleet = fleet_on(tls_server, tmp_path)
    fleet.start_agent(extra=("--ca-file", str(tls_server.ca_file)))
    try:
        done = fleet.run("echo over-tls")

        assert done["status"] == "succeeded", done
        assert done["stdout"] == "over-tls\n"
        pinned = fleet.agent_proc.state_dir / "ca.pem"
        assert pinned.read_text() == tls_server.ca_file.read_text()
    finally:
        fleet.agent_proc.kill(signal.SIGTERM)


def test_an_agent_started_without_rpc_flags_answers_check_status_over_tls(
    tls_server: TlsTetherServer, tmp_path: Path
) -> None:
    fleet = fleet_on(tls_server, tmp_path)
    fleet.start_agent(extra=("--ca-file", str(tls_server.ca_file)))

    def reachable() -> dict | None:
        status, answer = fleet.api.post(f"/api/agents/{fleet.agent_id}/check_status/", {})
        assert status == 200, answer
        return answer if answer["reachable"] else None

    try:
        answer = wait_for(reachable, timeout=5, interval=0.1, what="reachable over https")

        assert answer["status"] == "online"
        assert "error" not in answer
    finally:
        fleet.agent_proc.kill(signal.SIGTERM)


def test_a_server_another_ca_vouches_for_is_refused_before_registering(
    tls_server: TlsTetherServer, impostor: TlsTetherServer, tmp_path: Path
) -> None:
    fleet = fleet_on(impostor, tmp_path)
    state = tmp_path / "agent"
    state.mkdir()
    agent = AgentProcess(
        impostor, fleet.server_token, state, extra=("--ca-file", str(tls_server.ca_file))
    ).start()
    try:
        wait_for(lambda: VERIFY_FAILED in log_since(agent, 0), timeout=20, what="a verify failure")

        assert agent.proc.poll() is None  # it keeps trying, with backoff
        assert impostor.sql(
            "SELECT COUNT(*) FROM fleet_agent WHERE server_id = ?", fleet.server_id
        ) == [(0,)]
        assert not (state / "credentials.json").exists()
        assert "registered" not in log_since(agent, 0)
    finally:
        agent.kill(signal.SIGTERM)


def test_an_agent_pins_the_ca_it_got_at_registration(
    tls_server: TlsTetherServer,
    impostor: TlsTetherServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --ca-file the first registration trusts the system's store (here made to hold
    the server's CA); from then on the pinned CA alone decides, whatever the store says."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server.ca_file))
    fleet = fleet_on(tls_server, tmp_path)
    fleet.start_agent()
    agent = fleet.agent_proc
    assert (agent.state_dir / "ca.pem").read_text() == tls_server.ca_file.read_text()
    agent.kill(signal.SIGTERM)

    # The system's store now vouches for the impostor only: the pin still refuses it...
    monkeypatch.setenv("SSL_CERT_FILE", str(impostor.ca_file))
    offset = len(log_since(agent, 0))
    misled = AgentProcess(impostor, fleet.server_token, agent.state_dir).start()
    try:
        wait_for(
            lambda: VERIFY_FAILED in log_since(misled, offset), timeout=20, what="verify failure"
        )
    finally:
        misled.kill(signal.SIGTERM)

    # ...and still accepts the server it registered with.
    agent.start()
    try:
        done = fleet.run("echo pinned")

        assert done["status"] == "succeeded", done
        assert done["stdout"] == "pinned\n"
    finally:
        agent.kill(signal.SIGTERM)
