"""GET /metrics on a real `tether serve`, after a real agent ran a command."""

import http.client
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Fleet, TetherServer

pytestmark = pytest.mark.e2e


def scrape(tether: TetherServer) -> dict[tuple[str, tuple], float]:
    status, body = tether_get(tether, "/metrics")
    assert status == 200, body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def tether_get(
    tether: TetherServer, path: str, *, source: str = "127.0.0.1", headers: dict | None = None
) -> tuple[int, bytes]:
    """A GET from the given loopback address (Linux answers on all of 127.0.0.0/8)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", tether.port, timeout=30, source_address=(source, 0)
    )
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_it_shows_the_fleet_after_a_command_ran(tether: TetherServer, fleet: Fleet) -> None:
    before = scrape(tether)
    stdout_key = ("tether_output_bytes_total", (("stream", "stdout"),))

    done = fleet.run("printf metrics-e2e-output")

    assert done["status"] == "succeeded" and done["stdout"] == "metrics-e2e-output"
    after = scrape(tether)
    assert after[stdout_key] - before.get(stdout_key, 0) == len("metrics-e2e-output")
    assert after[("tether_agents", (("status", "online"),))] >= 1
    for status in ("pending", "online", "offline", "stopped", "upgrading"):
        assert ("tether_agents", (("status", status),)) in after
    assert after[("tether_commands", (("status", "succeeded"),))] >= 1
    sent = (("code", "201"), ("method", "POST"), ("route", "/api/agents/<pk>/send_command/"))
    assert after[("tether_requests_total", sent)] >= 1
    assert ("tether_queue_depth", ()) in after
    assert ("tether_held_polls", ()) in after
    assert ("tether_dispatch_seconds_count", ()) in after


def test_a_peer_outside_the_allowed_networks_is_refused_whatever_it_claims(
    tether: TetherServer,
) -> None:
    # 127.0.0.2 is not in the default 127.0.0.1/32, and it is no proxy the server trusts.
    status, body = tether_get(
        tether, "/metrics", source="127.0.0.2", headers={"X-Forwarded-For": "127.0.0.1"}
    )

    assert status == 403
    assert json.loads(body)["error"]["code"] == "permission_denied"
