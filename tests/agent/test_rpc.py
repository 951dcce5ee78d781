"""The agent's RPC endpoint, in-process: only requests signed with the agent's secret key, lately
and once, get an answer; a new certificate serves new connections while open ones keep theirs;
a certificate that does not match its key is refused and the old one stays. Also the agent's
client: which CA vouches for an https:// server, and `verify_ssl: false`."""

import contextlib
import datetime
import hashlib
import hmac
import http.client
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.agent.test_manifest import load_agent
from tests.conftest import free_port

agent = load_agent()

SECRET = "ab" * 32
AGENT_ID = 7


class Ca:
    """A throwaway certificate authority, as the server's `pki` app makes one."""

    def __init__(self, name: str = "Test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        public = self.key.public_key()
        self.cert = (
            validity(x509.CertificateBuilder())
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, cn: str = str(AGENT_ID)) -> tuple[str, str, int]:
        """(certificate PEM, key PEM, serial) for 127.0.0.1 and localhost."""
        key = ec.generate_private_key(ec.SECP256R1())
        serial = int.from_bytes(os.urandom(8), "big") >> 1
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        issuer_key = self.key.public_key()
        cert = (
            validity(x509.CertificateBuilder())
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem, serial


def validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca()


@pytest.fixture
def node(tmp_path: Path, ca: Ca):
    """An agent (not started: no poll loop, no workers) whose RPC port is free and whose state
    dir holds nothing yet; its RPC server is closed afterwards."""
    port = free_port()
    args = agent.parse_args(
        ["--server", "http://127.0.0.1:9", "--state-dir", str(tmp_path), "--rpc-port", str(port)]
    )
    client = agent.Client(args.server, None, args.state_dir)
    client.credentials = {"token": "0" * 32, "secret_key": SECRET, "agent_id": AGENT_ID}
    node = agent.Agent(args, client, agent.Journal(args.state_dir))
    yield node
    node.rpc.close()


@pytest.fixture(autouse=True)
def _quick_close(monkeypatch) -> None:
    """The accept loop looks for a shutdown every RPC_POLL_INTERVAL; tests close many."""
    monkeypatch.setattr(agent, "RPC_POLL_INTERVAL", 0.02)


def install(node, ca: Ca, cert: str | None = None, key: str | None = None) -> dict:
    """Deliver an update_certificate command the way a poll does, and run it as a worker
    would; returns the command's result."""
    if cert is None:
        cert, key, _ = ca.issue()
    spec = {
        "id": f"cert-{time.monotonic_ns()}",
        "kind": "internal",
        "command": "update_certificate",
        "payload": {"certificate": cert, "private_key": key, "ca_certificate": ca.pem},
    }
    assert agent.check_spec(spec) is None
    run = agent.Run({"id": spec["id"], "spec": spec, "state": "accepted"})
    run.payload = spec.pop("payload")  # as accept_command keeps it: in memory only
    node.journal.add(run)
    node.runner.execute_internal(run)
    return run.entry["result"]


def client_context(ca: Ca) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca.pem)


def connect(node, ca: Ca) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", node.rpc.port, context=client_context(ca), timeout=5
    )
    conn.connect()
    return conn


def signed_headers(method: str, path: str, body: bytes = b"", *, skew: int = 0) -> dict:
    timestamp = str(int(time.time()) + skew)
    signature = agent.request_signature(SECRET, method, path, timestamp, body)
    return {"X-Tether-Timestamp": timestamp, "X-Tether-Signature": signature}


def call(
    conn: http.client.HTTPSConnection, method: str, path: str, headers: dict, body: bytes = b""
) -> tuple[int, dict]:
    conn.request(method, path, body=body or None, headers=headers)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def assert_closed_without_answer(
    node, ca: Ca, method: str, path: str, headers: dict, body: bytes = b""
) -> None:
    conn = connect(node, ca)
    try:
        with pytest.raises((http.client.HTTPException, OSError)):  # sending may already fail
            conn.request(method, path, body=body or None, headers=headers)
            conn.getresponse()
    finally:
        conn.close()


def presented_serial(conn: http.client.HTTPSConnection) -> int:
    return x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True)).serial_number


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def serving(node, ca: Ca):
    """The node with a certificate installed: its RPC port answers."""
    result = install(node, ca)
    assert result["status"] == "succeeded", result
    return node


def test_nothing_listens_until_a_certificate_arrives(node, ca: Ca) -> None:
    node.rpc.start()
    assert not listening(node.rpc.port)

    assert install(node, ca)["status"] == "succeeded"

    assert listening(node.rpc.port)


def test_a_certificate_installed_before_a_restart_is_served_at_start(node, ca: Ca) -> None:
    cert, key, serial = ca.issue()
    agent.install_certificate(node.args.state_dir, {"certificate": cert, "private_key": key})

    node.rpc.start()

    conn = connect(node, ca)
    assert presented_serial(conn) == serial
    conn.close()


def test_update_certificate_writes_the_files_and_forgets_the_payload(node, ca: Ca) -> None:
    cert, key, _ = ca.issue()
    result = install(node, ca, cert, key)

    assert result["status"] == "succeeded"
    state = Path(node.args.state_dir)
    assert (state / "rpc.crt").read_text() == cert
    assert (state / "rpc.key").read_text() == key
    assert (state / "ca.pem").read_text() == ca.pem
    assert (state / "rpc.key").stat().st_mode & 0o777 == 0o600
    assert not list(state.glob("*.new"))
    journaled = [p.read_text() for p in (state / "commands").glob("*.json")]
    assert journaled and not any("PRIVATE KEY" in text for text in journaled)


def test_an_accepted_delivery_keeps_its_key_out_of_the_journal(node, ca: Ca) -> None:
    cert, key, _ = ca.issue()
    spec = {
        "id": "cert-accepted",
        "kind": "internal",
        "command": "update_certificate",
        "payload": {"certificate": cert, "private_key": key},
    }

    agent.accept_command(node, spec)

    journaled = (Path(node.args.state_dir) / "commands" / "cert-accepted.json").read_text()
    assert "PRIVATE KEY" not in journaled
    assert node.journal.get("cert-accepted").payload["private_key"] == key


def test_a_signed_status_request_is_answered(serving, ca: Ca) -> None:
    path = "/status?nonce=abc123"
    conn = connect(serving, ca)

    status, body = call(conn, "GET", path, signed_headers("GET", path))

    assert status == 200
    assert body["agent_id"] == AGENT_ID
    assert body["version"] == agent.__version__
    assert body["running"] == []
    assert len(body["load"]) == 3
    assert body["uptime"] >= 0


def test_status_lists_the_commands_that_run(serving, ca: Ca) -> None:
    for cid, state in (("41", "started"), ("42", "accepted"), ("43", "done")):
        serving.journal.add(agent.Run({"id": cid, "spec": {"id": int(cid)}, "state": state}))
    path = "/status?nonce=1"

    _, body = call(connect(serving, ca), "GET", path, signed_headers("GET", path))

    assert body["running"] == [41]


def test_wake_answers_202_and_ends_the_wait_between_polls(serving, ca: Ca) -> None:
    path = "/wake?nonce=2"
    assert not serving.woken.is_set()

    status, body = call(connect(serving, ca), "POST", path, signed_headers("POST", path))

    assert (status, body) == (202, {})
    assert serving.woken.is_set()


def test_a_wake_ends_the_agents_wait_between_polls(node) -> None:
    threading.Timer(0.1, node.woken.set).start()
    began = time.monotonic()

    node.idle(30)

    assert time.monotonic() - began < 5


def test_a_signed_request_for_an_unknown_path_gets_404(serving, ca: Ca) -> None:
    path = "/nothing-here?nonce=3"

    status, body = call(connect(serving, ca), "GET", path, signed_headers("GET", path))

    assert status == 404
    assert body["error"]["code"] == "not_found"


def test_the_agent_accepts_what_its_own_client_signs(serving, ca: Ca, tmp_path: Path) -> None:
    """One signing function for both directions: the agent's Client, pointed at the RPC
    port, is a correctly signing caller."""
    caller = agent.Client(f"https://127.0.0.1:{serving.rpc.port}", None, None)
    caller.ca_file = str(tmp_path / "ca.pem")  # written by update_certificate
    caller.credentials = serving.client.credentials

    resp = caller.request("POST", "/wake?nonce=4", {"reason": "test"})

    assert resp.status == 202


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Tether-Timestamp": str(int(time.time()))},
        {"X-Tether-Signature": "0" * 64},
        {"X-Tether-Timestamp": str(int(time.time())), "X-Tether-Signature": "0" * 64},
        {"X-Tether-Timestamp": "soon", "X-Tether-Signature": "0" * 64},
    ],
    ids=["unsigned", "no-signature", "no-timestamp", "wrong-signature", "bad-timestamp"],
)
def test_an_unsigned_or_wrongly_signed_request_is_closed_unanswered(
    serving, ca: Ca, headers: dict
) -> None:
    assert_closed_without_answer(serving, ca, "GET", "/status", headers)


def test_a_request_signed_for_another_path_or_body_is_refused(serving, ca: Ca) -> None:
    assert_closed_without_answer(
        serving, ca, "GET", "/status?nonce=x", signed_headers("GET", "/status?nonce=y")
    )
    assert_closed_without_answer(
        serving, ca, "POST", "/wake", signed_headers("POST", "/wake", b"{}"), b'{"a":1}'
    )
    assert_closed_without_answer(serving, ca, "POST", "/status", signed_headers("GET", "/status"))


def test_a_request_signed_with_another_key_is_refused(serving, ca: Ca) -> None:
    timestamp = str(int(time.time()))
    signature = agent.request_signature("cd" * 32, "GET", "/status", timestamp, b"")
    headers = {"X-Tether-Timestamp": timestamp, "X-Tether-Signature": signature}

    assert_closed_without_answer(serving, ca, "GET", "/status", headers)


@pytest.mark.parametrize("skew", [-31, 31])
def test_a_timestamp_outside_the_window_is_refused(serving, ca: Ca, skew: int) -> None:
    path = "/status?nonce=old"

    assert_closed_without_answer(serving, ca, "GET", path, signed_headers("GET", path, skew=skew))


def test_a_timestamp_inside_the_window_is_accepted(serving, ca: Ca) -> None:
    path = "/status?nonce=late"

    status, _ = call(connect(serving, ca), "GET", path, signed_headers("GET", path, skew=-25))

    assert status == 200


def test_a_replayed_request_is_refused(serving, ca: Ca) -> None:
    path = "/wake?nonce=once"
    headers = signed_headers("POST", path)
    assert call(connect(serving, ca), "POST", path, headers)[0] == 202

    assert_closed_without_answer(serving, ca, "POST", path, headers)


def test_the_replay_cache_forgets_signatures_outside_the_window(serving, ca: Ca) -> None:
    rpc = serving.rpc
    rpc.seen = {"x" * 64: int(time.time()) - 31}
    path = "/status?nonce=fresh"

    assert call(connect(serving, ca), "GET", path, signed_headers("GET", path))[0] == 200

    assert list(rpc.seen) == [signed_headers("GET", path)["X-Tether-Signature"]]


def test_a_full_replay_cache_refuses_rather_than_forgets(serving, ca: Ca, monkeypatch) -> None:
    monkeypatch.setattr(agent, "RPC_REPLAY_MAX", 1)
    path = "/status?nonce=first"
    assert call(connect(serving, ca), "GET", path, signed_headers("GET", path))[0] == 200

    path = "/status?nonce=second"
    assert_closed_without_answer(serving, ca, "GET", path, signed_headers("GET", path))


def test_a_body_over_the_limit_is_refused(serving, ca: Ca) -> None:
    body = b"x" * (agent.RPC_MAX_BODY + 1)

    assert_closed_without_answer(
        serving, ca, "POST", "/wake", signed_headers("POST", "/wake", body), body
    )


def test_a_request_that_is_not_http_gets_no_answer(serving, ca: Ca) -> None:
    conn = connect(serving, ca)
    conn.sock.sendall(b"BREW /pot HTCPCP/1.0\r\n\r\n")

    assert conn.sock.recv(100) == b""


def test_plain_http_gets_no_http_answer(serving) -> None:
    received = b""
    with socket.create_connection(("127.0.0.1", serving.rpc.port), timeout=5) as raw:
        raw.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(OSError):
            while chunk := raw.recv(100):  # a TLS alert at most, then the end
                received += chunk

    assert b"HTTP" not in received


def test_a_new_certificate_serves_new_connections_while_open_ones_keep_theirs(
    serving, ca: Ca
) -> None:
    before = connect(serving, ca)
    old_serial = presented_serial(before)

    cert, key, new_serial = ca.issue()
    assert install(serving, ca, cert, key)["status"] == "succeeded"

    after = connect(serving, ca)
    assert presented_serial(after) == new_serial != old_serial
    path = "/status?nonce=open"
    assert call(before, "GET", path, signed_headers("GET", path))[0] == 200  # the old session


def test_a_key_that_does_not_match_the_certificate_is_refused_and_the_old_one_stays(
    serving, ca: Ca
) -> None:
    old_serial = presented_serial(connect(serving, ca))
    state = Path(serving.args.state_dir)
    old_files = {name: (state / name).read_bytes() for name in ("rpc.crt", "rpc.key")}
    cert, _, _ = ca.issue()
    _, other_key, _ = ca.issue()

    result = install(serving, ca, cert, other_key)

    assert result["status"] == "failed"
    assert "do not load together" in result["error"]
    assert presented_serial(connect(serving, ca)) == old_serial
    assert {name: (state / name).read_bytes() for name in old_files} == old_files
    assert not list(state.glob("*.new"))


def test_a_delivery_without_a_certificate_fails(serving, ca: Ca) -> None:
    spec = {"id": "empty", "kind": "internal", "command": "update_certificate", "payload": {}}
    run = agent.Run({"id": "empty", "spec": spec, "state": "accepted"})
    run.payload = spec.pop("payload")
    serving.journal.add(run)

    serving.runner.execute_internal(run)

    assert run.entry["result"]["status"] == "failed"
    assert "missing" in run.entry["result"]["error"]


def test_a_busy_port_leaves_the_agent_without_rpc(node, ca: Ca) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", node.rpc.port))
        taken.listen()

        assert install(node, ca)["status"] == "succeeded"

        assert node.rpc.httpd is None


def test_a_slow_handshake_does_not_hold_up_other_callers(serving, ca: Ca) -> None:
    with socket.create_connection(("127.0.0.1", serving.rpc.port)):
        path = "/status?nonce=meanwhile"
        status, _ = call(connect(serving, ca), "GET", path, signed_headers("GET", path))

    assert status == 200


def test_the_endpoint_answers_over_ipv6_too(serving, ca: Ca) -> None:
    try:
        socket.create_connection(("::1", serving.rpc.port), timeout=2).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    context = client_context(ca)
    context.check_hostname = False  # the test certificate names 127.0.0.1; the CA still counts
    conn = http.client.HTTPSConnection("::1", serving.rpc.port, context=context, timeout=5)
    path = "/status?nonce=v6"

    assert call(conn, "GET", path, signed_headers("GET", path))[0] == 200


def test_idle_strangers_cannot_take_more_than_their_share(serving, ca: Ca) -> None:
    idle = [
        socket.create_connection(("127.0.0.1", serving.rpc.port))
        for _ in range(agent.RPC_MAX_CONNECTIONS)
    ]
    try:
        with socket.create_connection(("127.0.0.1", serving.rpc.port), timeout=5) as one_more:
            assert one_more.recv(1) == b""  # hung up at once: no slot left
    finally:
        for sock in idle:
            sock.close()

    def answered() -> bool:
        path = f"/status?nonce=after-{time.monotonic_ns()}"
        with contextlib.suppress(OSError, http.client.HTTPException):
            return call(connect(serving, ca), "GET", path, signed_headers("GET", path))[0] == 200
        return False

    deadline = time.monotonic() + 10
    while not answered():
        assert time.monotonic() < deadline, "slots were not given back"
        time.sleep(0.05)


# --- the agent as a client of an https:// server --------------------------------------------


def tls_client(node, **kw: object):
    client = agent.Client(f"https://127.0.0.1:{node.rpc.port}", **kw)
    client.credentials = node.client.credentials
    return client


def test_the_client_verifies_with_the_ca_file_it_was_given(serving, ca: Ca, tmp_path: Path) -> None:
    ca_file = tmp_path / "given.pem"
    ca_file.write_text(ca.pem)

    assert tls_client(serving, ca_file=str(ca_file)).request("POST", "/wake").status == 202


def test_the_client_refuses_a_server_another_ca_vouches_for(serving, tmp_path: Path) -> None:
    ca_file = tmp_path / "other.pem"
    ca_file.write_text(Ca("Other CA").pem)

    with pytest.raises(agent.TlsError, match="certificate verify failed"):
        tls_client(serving, ca_file=str(ca_file)).request("POST", "/wake")


def test_the_client_trusts_the_pinned_ca_alone(serving, ca: Ca, tmp_path: Path) -> None:
    pinned_dir = tmp_path / "pinned"
    pinned_dir.mkdir()
    client = tls_client(serving, state_dir=str(pinned_dir))
    with pytest.raises(agent.TlsError):  # before registration: the system's trust store
        client.request("POST", "/wake")

    client.pin_ca(ca.pem)

    assert client.request("POST", "/wake?nonce=pinned").status == 202
    client.pin_ca(Ca("Other CA").pem)
    with pytest.raises(agent.TlsError):
        client.request("POST", "/wake")


def test_verify_ssl_false_skips_verification_and_is_remembered(serving, tmp_path: Path) -> None:
    state = tmp_path / "unverified"
    state.mkdir()
    client = tls_client(serving, state_dir=str(state))
    (state / "ca.pem").write_text(Ca("Other CA").pem)

    client.set_verify_ssl(False)

    assert client.request("POST", "/wake?nonce=a").status == 202
    again = tls_client(serving, state_dir=str(state))
    assert again.verify_ssl is False
    assert again.request("POST", "/wake?nonce=b").status == 202
    again.set_verify_ssl(True)
    with pytest.raises(agent.TlsError):
        again.request("POST", "/wake?nonce=c")


def test_verify_ssl_comes_with_the_server_config(node) -> None:
    node.adopt_config({"poll_interval": 1, "verify_ssl": False})
    assert node.client.verify_ssl is False

    node.adopt_config({"poll_interval": 1})
    assert node.client.verify_ssl is False  # not said: unchanged

    node.adopt_config({"poll_interval": 1, "verify_ssl": True})
    assert node.client.verify_ssl is True


def test_the_signature_is_the_documented_hmac() -> None:
    body = b'{"a":1}'
    message = "\n".join(["POST", "/wake?nonce=1", "1700000000", hashlib.sha256(body).hexdigest()])
    expected = hmac.new(SECRET.encode(), message.encode(), hashlib.sha256).hexdigest()

    assert agent.request_signature(SECRET, "POST", "/wake?nonce=1", "1700000000", body) == expected
