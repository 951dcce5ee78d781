"""HTTP is bounded before Django sees a request (issue 13, rows 1, 7, 8, 10): each bad request
is refused with a readable JSON error while a healthy client on another connection keeps
getting `GET /healthz` within 100 ms, and the server's memory stays put."""

import contextlib
import http.client
import json
import select
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_PASSWORD, BIN, Api, TetherServer, free_port, wait_for

MiB = 1024 * 1024
HEAD_TIMEOUT = 1.0  # the test server's TETHER_HTTP_HEAD_TIMEOUT and _BODY_TIMEOUT


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherServer]:
    env = {
        "TETHER_HTTP_HEAD_TIMEOUT": str(HEAD_TIMEOUT),
        "TETHER_HTTP_BODY_TIMEOUT": str(HEAD_TIMEOUT),
        "TETHER_HTTP_BODY_MIN_RATE": "1000",
        "TETHER_HEARTBEAT_INTERVAL": "5",  # polls may be held 10 s (2 heartbeats)
    }
    tether = TetherServer(tmp_path_factory.mktemp("http-limits"), env).setup().start()
    yield tether
    tether.kill()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class HealthyClient(threading.Thread):
    """Another connection asking `GET /healthz` again and again; every answer's latency."""

    def __init__(self, server: TetherServer) -> None:
        super().__init__(daemon=True)
        self.port = server.port
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()
            except OSError as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                continue
            self.latencies.append(time.perf_counter() - started)
            if response.status != 200:
                self.failures.append(f"status {response.status}")
            self.stop.wait(0.01)  # pace: about 50 answers a second
        conn.close()


@contextlib.contextmanager
def while_healthy(server: TetherServer) -> Iterator[None]:
    """Run the body while a healthy client keeps asking; then hold it to 100 ms an answer
    and the server to its memory."""
    rss_before = rss_mib(server.proc.pid)
    client = HealthyClient(server)
    client.start()
    wait_for(lambda: len(client.latencies) >= 3, timeout=10, what="healthy answers")
    try:
        yield
        after = len(client.latencies)  # and it still answers once the bad request is gone
        wait_for(lambda: len(client.latencies) >= after + 3, timeout=10, what="answers after")
    finally:
        client.stop.set()
        client.join(10)
    assert not client.failures, client.failures[:5]
    assert max(client.latencies) < 0.1, sorted(client.latencies)[-5:]
    assert rss_mib(server.proc.pid) - rss_before < 40


def raw(server: TetherServer, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_answer(sock: socket.socket) -> tuple[int, dict, dict]:
    """Status, headers and JSON body of the one answer on the socket (then it must close)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def send_until_refused(sock: socket.socket, head: bytes, filler: bytes, total: int) -> int:
    """Send the head, then `filler` up to `total` bytes, stopping as soon as an answer is
    there to read; the bytes sent."""
    sock.sendall(head)
    sent = len(head)
    while sent < total:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(filler)
        except OSError:  # refused and closed before we looked
            break
        sent += len(filler)
    return sent


def test_a_128_mib_header_is_refused_after_its_first_kilobytes(server: TetherServer) -> None:
    with while_healthy(server), raw(server) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
        sent = send_until_refused(sock, head, b"a" * 65536, 128 * MiB)
        status, headers, body = read_answer(sock)
    assert status == 431
    assert body["error"]["code"] == "headers_too_large"
    assert headers["connection"] == "close"
    assert sent < 8 * MiB  # refused early, not after reading it all


def test_twenty_thousand_headers_are_refused(server: TetherServer) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n"
    with while_healthy(server), raw(server) as sock:
        sock.sendall(request)
        status, _, body = read_answer(sock)
    assert (status, body["error"]["code"]) == (431, "headers_too_large")


def test_more_header_fields_than_the_limit_are_refused_however_small(
    server: TetherServer,
) -> None:
    fields = b"".join(b"X-%d: b\r\n" % n for n in range(101))
    with raw(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields + b"\r\n")
        status, _, body = read_answer(sock)
    assert (status, body["error"]["code"]) == (431, "headers_too_large")
    assert "100 header fields" in body["error"]["message"]


def test_a_1_mib_request_line_is_refused(server: TetherServer) -> None:
    with while_healthy(server), raw(server) as sock:
        # All of it: what arrives after the refusal is read and dropped, not reset.
        sock.sendall(b"GET /healthz?q=" + b"a" * MiB + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body = read_answer(sock)
    assert (status, body["error"]["code"]) == (414, "uri_too_long")


def test_a_target_longer_than_the_request_line_limit_is_refused(server: TetherServer) -> None:
    with raw(server) as sock:
        sock.sendall(b"GET /healthz?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body = read_answer(sock)
    assert (status, body["error"]["code"]) == (414, "uri_too_long")


def test_a_slowloris_head_is_cut_at_the_head_timeout(server: TetherServer) -> None:
    with while_healthy(server), raw(server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        # One byte of header every 0.2 s: never idle long, never done.
        while not select.select([sock], [], [], 0.2)[0]:
            assert time.monotonic() - started < 5, "never cut"
            with contextlib.suppress(OSError):
                sock.sendall(b"X")
        status, _, body = read_answer(sock)
        took = time.monotonic() - started
    assert (status, body["error"]["code"]) == (408, "timeout")
    assert HEAD_TIMEOUT - 0.1 <= took < HEAD_TIMEOUT + 2  # its clock starts at connect


def test_a_connection_that_never_asks_is_closed(server: TetherServer) -> None:
    with raw(server) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, nothing said
    assert time.monotonic() - started < HEAD_TIMEOUT + 2


def test_a_slow_body_is_cut_at_the_body_timeout(server: TetherServer) -> None:
    with while_healthy(server), raw(server) as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /api/auth/token/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        while not select.select([sock], [], [], 0.2)[0]:
            assert time.monotonic() - started < 5, "never cut"
            with contextlib.suppress(OSError):
                sock.sendall(b" ")
        status, _, body = read_answer(sock)
    assert (status, body["error"]["code"]) == (408, "timeout")


def test_a_33_mib_result_body_gets_a_readable_413(server: TetherServer) -> None:
    """A client that writes its whole body before reading (http.client, as agents do) reads
    the refusal instead of a connection reset."""
    body = b"x" * (33 * MiB)
    with while_healthy(server):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request(
            "POST",
            "/api/agents/command/1/result/",
            body=body,
            headers={"Content-Type": "application/json", "X-Agent-Token": str(uuid.uuid4())},
        )
        response = conn.getresponse()
        payload = json.loads(response.read())
        conn.close()
    assert response.status == 413
    assert payload["error"]["code"] == "too_large"
    assert response.getheader("Connection") == "close"


def test_a_chunked_body_growing_past_the_limit_gets_a_413(server: TetherServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (b"x" * 65536 for _ in range(64))  # 4 MiB; human paths take 1 MiB
    conn.request(
        "POST",
        "/api/auth/token/",
        body=chunks,
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    assert (response.status, payload["error"]["code"]) == (413, "too_large")


def test_x_forwarded_for_from_loopback_changes_no_address(server: TetherServer) -> None:
    """Neither the stored agent address (which check_status dials) nor the peer that
    /metrics admits (loopback only by default) comes from X-Forwarded-For."""
    forged = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    status, _ = Api(server.url).get("/metrics", headers=forged)
    assert status == 200  # still loopback, so still allowed
    api = server.login("admin", ADMIN_PASSWORD)
    status, created = api.post("/api/servers/", {"name": "xff", "host": "127.0.0.1"})
    assert status == 201, created
    status, agent = Api(server.url).post(
        "/api/agents/register/",
        {"server_token": created["server_token"], "hostname": "xff", "version": "1.0.0"},
        headers=forged,
    )
    assert status == 201, agent
    [(address,)] = server.sql("SELECT address FROM fleet_agent WHERE id = ?", agent["agent_id"])
    assert str(address) == "127.0.0.1"  # PostgreSQL reads inet as an ip_address


def test_the_install_url_never_comes_from_the_host_header(
    server: TetherServer, tmp_path: Path
) -> None:
    api = server.login("admin", ADMIN_PASSWORD)
    key = tmp_path / "key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    status, created = api.post(
        "/api/servers/",
        {
            "name": "install",
            "host": "127.0.0.1",
            "ssh_port": free_port(),  # nothing listens: the run fails at once
            "ssh_private_key": key.read_text(),
        },
    )
    assert status == 201, created
    path = f"/api/servers/{created['id']}/install/"

    status, body = api.post(path, headers={"Host": "attacker.example:1"})
    assert (status, body["error"]["code"]) == (400, "bad_request")
    assert not server.sql("SELECT id FROM deploy_deployment WHERE server_id = ?", created["id"])

    # A name the server answers to, but not the one it gives agents.
    status, body = api.post(path, headers={"Host": f"localhost:{server.port}"})
    assert status == 202, body
    [(url,)] = server.sql(
        "SELECT server_url FROM deploy_deployment WHERE id = ?", body["deployment_id"]
    )
    assert url == server.url


def test_held_polls_and_streams_outlive_the_head_and_body_timeouts(
    server: TetherServer,
) -> None:
    api = server.login("admin", ADMIN_PASSWORD)
    _, created = api.post("/api/servers/", {"name": "held", "host": "127.0.0.1"})
    _, agent = Api(server.url).post(
        "/api/agents/register/",
        {"server_token": created["server_token"], "hostname": "held", "version": "1.0.0"},
    )
    agent_api = Api(server.url, {"X-Agent-Token": agent["token"]})
    wait = 3 * HEAD_TIMEOUT
    started = time.monotonic()
    status, body = agent_api.get(f"/api/agents/poll_commands/?wait={wait:g}")
    assert (status, body["commands"]) == (200, [])
    assert time.monotonic() - started >= wait - 0.5  # held its whole wait, not cut

    _, command = api.post(f"/api/agents/{agent['agent_id']}/send_command/", {"command": "true"})
    token = api.headers["Authorization"]
    with raw(server) as sock:
        sock.sendall(
            f"GET /api/commands/{command['id']}/stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.settimeout(wait)
        with contextlib.suppress(TimeoutError):
            while sock.recv(65536):  # events; b"" would be the server closing it
                pass
            raise AssertionError("the stream was closed")
        status, _ = api.post(f"/api/commands/{command['id']}/cancel/")
        assert status == 202
        sock.settimeout(10)
        assert b"cancelled" in sock.recv(65536)


def test_behind_named_proxies_the_forwarded_address_is_the_clients(tmp_path: Path) -> None:
    """With TETHER_NUM_PROXIES and TETHER_FORWARDED_ALLOW_IPS, the proxy's X-Forwarded-For
    names the client: its stored address, and /metrics no longer admits it as loopback."""
    env = {"TETHER_NUM_PROXIES": "1", "TETHER_FORWARDED_ALLOW_IPS": "127.0.0.1"}
    proxied = TetherServer(tmp_path / "data", env).setup().start()
    try:
        forwarded = {"X-Forwarded-For": "203.0.113.7"}
        assert Api(proxied.url).get("/metrics", headers=forwarded)[0] == 403
        api = proxied.login("admin", ADMIN_PASSWORD)
        _, created = api.post("/api/servers/", {"name": "proxied", "host": "127.0.0.1"})
        status, agent = Api(proxied.url).post(
            "/api/agents/register/",
            {"server_token": created["server_token"], "hostname": "p", "version": "1.0.0"},
            headers=forwarded,
        )
        assert status == 201, agent
        [(address,)] = proxied.sql(
            "SELECT address FROM fleet_agent WHERE id = ?", agent["agent_id"]
        )
        assert str(address) == "203.0.113.7"
    finally:
        proxied.kill()


def test_trusted_proxies_without_a_proxy_count_stop_the_server(tmp_path: Path) -> None:
    """Trusting X-Forwarded-For in the server but not in the throttles would make them
    disagree about who the client is: refused at start, with the reason."""
    server = TetherServer(tmp_path / "data", {"TETHER_FORWARDED_ALLOW_IPS": "10.0.0.0/8"})
    result = subprocess.run(
        [str(BIN / "tether"), "serve", "--bind", f"127.0.0.1:{server.port}"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "TETHER_NUM_PROXIES" in result.stderr
