"""The audit log on a real `tether serve` (issue 13, row 8): a human action and an agent's
registration are recorded with the address the request really came from (each sent from
its own loopback address) and the client's user agent; a forged X-Forwarded-For changes
nothing without a trusted proxy."""

import http.client
import json
import uuid
from typing import Any

import pytest

from tests.conftest import Api, TetherServer

pytestmark = pytest.mark.e2e


def send_from(
    tether: TetherServer, source: str, method: str, path: str, body: Any, headers: dict
) -> tuple[int, Any]:
    """A JSON request from the given loopback address (Linux answers on all of 127/8)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", tether.port, timeout=30, source_address=(source, 0)
    )
    try:
        conn.request(
            method,
            path,
            body=json.dumps(body),
            headers={"Content-Type": "application/json", **headers},
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def only_event(admin_api: Api, **query: str) -> dict:
    status, page = admin_api.get("/api/audit/?" + "&".join(f"{k}={v}" for k, v in query.items()))
    assert status == 200, page
    assert len(page["results"]) == 1, page
    return page["results"][0]


def test_a_human_action_and_a_registration_say_where_they_came_from(
    tether: TetherServer, admin_api: Api
) -> None:
    name = f"audit-{uuid.uuid4().hex[:8]}"
    status, server = send_from(
        tether,
        "127.0.0.2",
        "POST",
        "/api/servers/",
        {"name": name, "host": "10.9.9.9"},
        {**admin_api.headers, "User-Agent": "audit-e2e/1.0", "X-Forwarded-For": "203.0.113.9"},
    )
    assert status == 201, server

    created = only_event(admin_api, action="server.create", target=f"server:{server['id']}")
    assert created["actor"] == "admin"
    assert created["address"] == "127.0.0.2"  # the peer, not what it claimed to forward
    assert created["user_agent"] == "audit-e2e/1.0"

    status, registration = send_from(
        tether,
        "127.0.0.3",
        "POST",
        "/api/agents/register/",
        {"server_token": server["server_token"], "hostname": name},
        {"User-Agent": "tether-agent-e2e"},
    )
    assert status == 201, registration

    registered = only_event(admin_api, action="agent.", target=f"agent:{registration['agent_id']}")
    assert registered["action"] == "agent.register"
    assert registered["actor"] is None
    assert registered["address"] == "127.0.0.3"
    assert registered["user_agent"] == "tether-agent-e2e"
    assert registered["details"] == {"server": server["id"], "hostname": name, "new": True}
