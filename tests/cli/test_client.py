"""tetherctl's HTTP client against a stub server: errors as one line, paged lists, SSE, and
the run request retried with the same Idempotency-Key after a dropped connection."""

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.conftest import free_port
from tether_cli.client import Client, Event, describe_http_error, parse_sse
from tether_cli.config import Login
from tether_cli.errors import CliError, ConnectionFailed
from tether_cli.runs import start_run

Handler = Callable[[BaseHTTPRequestHandler], None]


class Stub:
    """A loopback HTTP server whose answers the test sets per method and path."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        stub = self

        class Answer(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                stub.requests.append((self.command, self.path, dict(self.headers), body))
                stub.routes[(self.command, self.path)](self)

            do_GET = do_POST = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def json(
        self, method: str, path: str, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> None:
        def answer(handler: BaseHTTPRequestHandler) -> None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)

        self.routes[(method, path)] = answer


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    yield server
    server.server.shutdown()


def client_for(stub: Stub) -> Client:
    return Client(Login(url=stub.url, token="secret-token"))


def test_an_api_error_is_one_line_with_its_status() -> None:
    body = json.dumps({"error": {"code": "authentication_failed", "message": "Invalid token."}})
    error = describe_http_error(401, body.encode())

    assert str(error) == "authentication failed (401): Invalid token."
    assert (error.status, error.code) == (401, "authentication_failed")


def test_a_throttled_call_says_when_to_try_again(stub: Stub) -> None:
    body = {"error": {"code": "throttled", "message": "Request was throttled.", "retry_after": 42}}
    stub.json("GET", "/api/agents/", 429, body, headers={"Retry-After": "42"})

    with pytest.raises(CliError) as raised:
        client_for(stub).get("/api/agents/")

    assert str(raised.value) == "throttled (429): try again in 42 s."
    assert raised.value.status == 429


def test_an_answer_that_is_not_the_apis_says_what_the_status_means() -> None:
    assert str(describe_http_error(502, b"<html>Bad gateway</html>")) == "server error (502)"
    assert str(describe_http_error(404, b"")) == "not found (404)"
    assert str(describe_http_error(418, b'{"error": "x"}')) == "error (418)"


def test_it_sends_the_token_and_reads_json(stub: Stub) -> None:
    stub.json("GET", "/api/agents/7/", 200, {"id": 7})

    assert client_for(stub).get("/api/agents/7/") == {"id": 7}
    headers = stub.requests[0][2]
    assert headers["Authorization"] == "Token secret-token"


def test_it_follows_next_through_every_page(stub: Stub) -> None:
    stub.json(
        "GET",
        "/api/agents/?tag=web",
        200,
        {"count": 3, "next": f"{stub.url}/api/agents/?page=2&tag=web", "results": [{"id": 1}]},
    )
    stub.json(
        "GET", "/api/agents/?page=2&tag=web", 200, {"next": None, "results": [{"id": 2}, {"id": 3}]}
    )

    agents = client_for(stub).get_all("/api/agents/", tag="web", status="")

    assert [a["id"] for a in agents] == [1, 2, 3]


def test_a_refusal_raises_one_error_with_the_apis_message(stub: Stub) -> None:
    stub.json("POST", "/api/runs/", 400, {"error": {"code": "invalid", "message": "targets: x"}})

    with pytest.raises(CliError) as raised:
        client_for(stub).post("/api/runs/", {})
    assert str(raised.value) == "refused (400): targets: x"


def test_a_server_that_is_not_there_is_a_connection_error() -> None:
    client = Client(Login(url=f"http://127.0.0.1:{free_port()}", token="t"))

    with pytest.raises(ConnectionFailed, match=r"cannot connect to http://127\.0\.0\.1:\d+: "):
        client.get("/api/agents/")


def test_sse_lines_become_events() -> None:
    lines = [
        ": keepalive\n",
        "\n",
        "event: output\n",
        'data: {"data": "a"}\n',
        "\n",
        "data: plain\n",
        "data: text\n",
        "\n",
        "event:end\r\n",
        "data:{}\r\n",
        "\r\n",
        "event: ignored-without-data\n",
        "\n",
    ]
    assert list(parse_sse(lines)) == [
        Event("output", {"data": "a"}),
        Event("message", "plain\ntext"),
        Event("end", {}),
    ]


def test_it_reads_an_event_stream_until_the_server_closes_it(stub: Stub) -> None:
    def stream(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        handler.wfile.write(b'event: counts\ndata: {"n": 1}\n\n: keepalive\n\n')
        handler.wfile.write(b'event: end\ndata: {"id": 3}\n\n')
        handler.close_connection = True

    stub.routes[("GET", "/api/runs/3/stream/")] = stream

    events = list(client_for(stub).events("/api/runs/3/stream/"))

    assert events == [Event("counts", {"n": 1}), Event("end", {"id": 3})]


def test_a_run_request_is_retried_once_with_the_same_idempotency_key(stub: Stub) -> None:
    answers = iter(["drop", "run"])

    def create(handler: BaseHTTPRequestHandler) -> None:
        if next(answers) == "drop":
            handler.close_connection = True  # no answer: the client cannot know what happened
            return
        payload = json.dumps({"id": 9, "targets": []}).encode()
        handler.send_response(201)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    stub.routes[("POST", "/api/runs/")] = create

    run = start_run(client_for(stub), {"command": "true", "targets": {"all": True}})

    assert run["id"] == 9
    keys = [headers["Idempotency-Key"] for _, _, headers, _ in stub.requests]
    assert len(keys) == 2 and keys[0] == keys[1] and len(keys[0]) == 36


def test_a_run_request_is_not_retried_twice(stub: Stub) -> None:
    def drop(handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True

    stub.routes[("POST", "/api/runs/")] = drop

    with pytest.raises(ConnectionFailed):
        start_run(client_for(stub), {"command": "true", "targets": {"all": True}})
    assert len(stub.requests) == 2


def test_a_redirect_is_refused_so_the_token_goes_nowhere_else(stub: Stub) -> None:
    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", "http://elsewhere.test/api/agents/")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    stub.routes[("GET", "/api/agents/")] = redirect

    with pytest.raises(CliError, match=r"redirects to http://elsewhere\.test/api/agents/ \(302\)"):
        client_for(stub).get("/api/agents/")
