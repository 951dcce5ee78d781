"""Pull-mode status checks and certificate rotation against a real agent's RPC endpoint."""

import contextlib
import hashlib
import hmac
import json
import re
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import AGENT, Api, Fleet, TetherServer, free_port, wait_for

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def tls_to(port: int) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to the agent's RPC port that accepts any certificate: the tests look
    at what it presents and answers, not whether it verifies."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        yield tls


def presented_serial(port: int) -> str:
    """The serial of the certificate the agent's RPC port presents right now."""
    with tls_to(port) as tls:
        der = tls.getpeercert(binary_form=True)
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


class RpcFleet(Fleet):
    def __init__(self, server: TetherServer, api: Api, tmp: Path, max_concurrent: int) -> None:
        super().__init__(server, api, tmp)
        self.rpc_port = free_port()
        self.start_agent(
            extra=("--rpc-port", str(self.rpc_port), "--max-concurrent", str(max_concurrent))
        )
        self.certificate = wait_for(self.installed, timeout=30, what="certificate installed")

    def installed(self) -> dict | None:
        status, body = self.api.post(f"/api/agents/{self.agent_id}/update_certificate/", {})
        assert status == 200, body
        return body if body["serial"] and not body["pending"] else None

    def check(self) -> dict:
        status, body = self.api.post(f"/api/agents/{self.agent_id}/check_status/", {})
        assert status == 200, body
        return body


@pytest.fixture
def rpc_fleet(tether: TetherServer, admin_api: Api, tmp_path: Path) -> RpcFleet:
    fleet = RpcFleet(tether, admin_api, tmp_path, max_concurrent=1)
    yield fleet
    if fleet.agent_proc.proc.poll() is None:
        fleet.agent_proc.kill(signal.SIGTERM)


def test_check_status_reaches_a_running_agent_and_reports_a_stopped_one(
    rpc_fleet: RpcFleet,
) -> None:
    running = rpc_fleet.send("sleep 30")
    wait_for(lambda: rpc_fleet.command(running["id"])["status"] == "running", what="running")

    answer = rpc_fleet.check()

    assert answer["reachable"] is True, answer
    assert answer["status"] == "online"
    declared = re.search(r'^__version__ = "([^"]+)"', AGENT.read_text(), re.M).group(1)
    assert answer["version"] == declared
    assert running["id"] in [int(i) for i in answer["running"]]
    assert answer["latency_ms"] < 3000
    assert "error" not in answer

    rpc_fleet.agent_proc.kill(signal.SIGTERM)
    began = time.monotonic()
    answer = rpc_fleet.check()

    assert time.monotonic() - began < 4  # TETHER_RPC_TIMEOUT is 3 s
    assert answer["reachable"] is False
    assert "refused" in answer["error"], answer


def test_a_revoked_certificate_is_refused_and_its_successor_accepted(rpc_fleet: RpcFleet) -> None:
    # The agent's one worker is busy, so the new certificate waits in its queue while the
    # agent still serves the old one, which the regenerate has just revoked.
    busy = rpc_fleet.send("sleep 60")
    wait_for(lambda: rpc_fleet.command(busy["id"])["status"] == "running", what="busy")
    old_serial = rpc_fleet.certificate["serial"]
    status, body = rpc_fleet.api.post(
        f"/api/agents/{rpc_fleet.agent_id}/update_certificate/", {"regenerate": True}
    )
    assert status == 200 and body["pending"], body
    assert presented_serial(rpc_fleet.rpc_port) == old_serial

    answer = rpc_fleet.check()

    assert answer["reachable"] is False
    assert "revoked" in answer["error"], answer

    status, _ = rpc_fleet.api.post(f"/api/commands/{busy['id']}/cancel/")
    assert status == 202
    wait_for(rpc_fleet.installed, timeout=30, what="new certificate installed")
    assert presented_serial(rpc_fleet.rpc_port) == body["serial"]
    assert rpc_fleet.check()["reachable"] is True


def test_regenerate_rotates_the_served_certificate_without_touching_running_work(
    tether: TetherServer, admin_api: Api, tmp_path: Path
) -> None:
    fleet = RpcFleet(tether, admin_api, tmp_path, max_concurrent=4)
    try:
        old_serial = presented_serial(fleet.rpc_port)
        assert old_serial == fleet.certificate["serial"]
        started = fleet.send("for i in $(seq 1 30); do echo line-$i; sleep 0.1; done")
        wait_for(lambda: fleet.command(started["id"])["status"] == "running", what="running")

        status, body = fleet.api.post(
            f"/api/agents/{fleet.agent_id}/update_certificate/", {"regenerate": True}
        )

        assert status == 200, body
        assert body["serial"] != old_serial
        wait_for(
            lambda: presented_serial(fleet.rpc_port) == body["serial"],
            timeout=20,
            what="the new serial on the RPC port",
        )
        assert fleet.command(started["id"])["status"] == "running"  # rotated mid-command
        finished = fleet.wait_final(started["id"])
        assert finished["status"] == "succeeded"
        assert finished["stdout"] == "".join(f"line-{i}\n" for i in range(1, 31))
        assert fleet.check()["reachable"] is True
    finally:
        fleet.agent_proc.kill(signal.SIGTERM)


def request_bytes(secret: str | None, path: str, skew: int = 0) -> bytes:
    """A raw GET, signed with `secret` (None: unsigned) as the server signs its RPC calls."""
    headers = ""
    if secret is not None:
        timestamp = str(int(time.time()) + skew)
        message = "\n".join(["GET", path, timestamp, hashlib.sha256(b"").hexdigest()])
        signature = hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()
        headers = f"X-Tether-Timestamp: {timestamp}\r\nX-Tether-Signature: {signature}\r\n"
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()


def rpc_raw(port: int, request: bytes) -> bytes:
    """What the agent's RPC port answers to `request` (b"" if it hung up unanswered)."""
    with tls_to(port) as tls:
        tls.sendall(request)
        answer = b""
        try:
            while chunk := tls.recv(65536):
                answer += chunk
        except (ssl.SSLError, OSError):
            pass
    return answer


def test_the_agent_answers_only_fresh_requests_signed_with_its_key(rpc_fleet: RpcFleet) -> None:
    secret = json.loads((rpc_fleet.agent_proc.state_dir / "credentials.json").read_text())[
        "secret_key"
    ]
    port = rpc_fleet.rpc_port

    def answer(secret: str | None, nonce: str, skew: int = 0) -> bytes:
        return rpc_raw(port, request_bytes(secret, f"/status?nonce={nonce}", skew))

    assert answer(secret, "a").startswith(b"HTTP/1.1 200")  # the control
    assert answer(None, "b") == b""  # unsigned
    assert answer("00" * 32, "c") == b""  # another key
    assert answer(secret, "d", skew=-31) == b""  # too old
    assert answer(secret, "e", skew=31) == b""  # from the future
    replayed = request_bytes(secret, "/status?nonce=f")
    assert rpc_raw(port, replayed).startswith(b"HTTP/1.1 200")
    assert rpc_raw(port, replayed) == b""  # the same signed request again
