"""Throttles against a real `tether serve` at its default rates (issue 13, rows 5 and 7).

Loopback gives the test as many client addresses as it needs: each test speaks from its own
127.0.0.x. (uvicorn trusts X-Forwarded-For from 127.0.0.1 unless told not to; from any other
address these hold whatever it is told.)"""

import http.client
import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ADMIN_PASSWORD, FAST_ENV, TetherServer

DEFAULT_RATES = {
    "TETHER_REGISTER_RATE": 60,
    "TETHER_AGENT_AUTH_FAIL_RATE": 60,
    "TETHER_POLL_RATE": 120,
}
UNKNOWN_TOKEN = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherServer]:
    tether = TetherServer(tmp_path_factory.mktemp("throttles"))
    for name in FAST_ENV:
        if name.endswith("_RATE"):
            tether.env.pop(name)  # the real defaults
    tether.setup().start()
    yield tether
    tether.kill(signal.SIGTERM)


class Caller:
    """HTTP from one loopback address, on one kept-alive connection."""

    def __init__(self, server: TetherServer, address: str) -> None:
        self.connection = http.client.HTTPConnection(
            "127.0.0.1", server.port, timeout=30, source_address=(address, 0)
        )

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        payload = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        self.connection.request(method, path, body=payload, headers=all_headers)
        response = self.connection.getresponse()
        data = response.read()
        return response.status, dict(response.headers), json.loads(data or b"null")

    def poll(self, token: str) -> tuple[int, dict[str, str], Any]:
        return self.call(
            "GET", "/api/agents/poll_commands/?wait=0", headers={"X-Agent-Token": token}
        )


def assert_throttled(answer: tuple[int, dict[str, str], Any]) -> None:
    status, headers, body = answer
    assert status == 429, body
    assert body["error"]["code"] == "throttled"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert body["error"]["retry_after"] == int(headers["retry-after"])


@pytest.fixture(scope="module")
def server_token(server: TetherServer) -> str:
    api = server.login("admin", ADMIN_PASSWORD)
    status, body = api.post("/api/servers/", {"name": "throttled", "host": "10.9.9.9"})
    assert status == 201, body
    return body["server_token"]


def register(caller: Caller, server_token: str, hostname: str) -> str:
    status, _, body = caller.call(
        "POST", "/api/agents/register/", {"server_token": server_token, "hostname": hostname}
    )
    assert status == 201, body
    return body["token"]


def test_a_new_forwarded_for_each_time_does_not_escape_the_registration_throttle(
    server: TetherServer,
) -> None:
    caller = Caller(server, "127.0.0.2")
    body = {"server_token": "wrong", "hostname": "guess"}
    limit = DEFAULT_RATES["TETHER_REGISTER_RATE"]

    statuses = {
        caller.call("POST", "/api/agents/register/", body, {"X-Forwarded-For": f"203.0.113.{i}"})[0]
        for i in range(limit)
    }

    assert statuses == {401}
    assert_throttled(
        caller.call("POST", "/api/agents/register/", body, {"X-Forwarded-For": "198.51.100.1"})
    )
    assert Caller(server, "127.0.0.3").call("POST", "/api/agents/register/", body)[0] == 401


def test_an_address_failing_agent_authentication_is_refused_while_agents_poll_on(
    server: TetherServer, server_token: str
) -> None:
    agent = Caller(server, "127.0.0.4")
    token = register(agent, server_token, "honest")
    intruder = Caller(server, "127.0.0.5")
    limit = DEFAULT_RATES["TETHER_AGENT_AUTH_FAIL_RATE"]

    refused = {intruder.poll(UNKNOWN_TOKEN)[0] for _ in range(limit)}

    assert refused == {401}
    assert_throttled(intruder.poll(UNKNOWN_TOKEN))
    assert_throttled(intruder.poll(token))  # no token is looked at any more, good or not
    assert_throttled(
        intruder.call("POST", "/api/agents/heartbeat/", {}, {"X-Agent-Token": UNKNOWN_TOKEN})
    )
    assert agent.poll(token)[0] == 200
    status, _, _ = agent.call("POST", "/api/agents/heartbeat/", {}, {"X-Agent-Token": token})
    assert status == 200


def test_an_agent_polling_too_fast_is_throttled_and_no_other(
    server: TetherServer, server_token: str
) -> None:
    caller = Caller(server, "127.0.0.6")
    hasty = register(caller, server_token, "hasty")
    calm = register(caller, server_token, "calm")
    limit = DEFAULT_RATES["TETHER_POLL_RATE"]

    statuses = {caller.poll(hasty)[0] for _ in range(limit)}

    assert statuses == {200}
    assert_throttled(caller.poll(hasty))
    assert caller.poll(calm)[0] == 200
