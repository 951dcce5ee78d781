"""Pull-mode status checks out of the box: an agent started with the README's flags alone serves
its RPC endpoint (on the default port, or on one the OS picks when that is taken), gets its
certificate and answers check_status within seconds of coming online; `--no-rpc` turns it off.
Real server, real agent processes on loopback."""

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.test_manifest import load_agent
from tests.conftest import Api, Fleet, TetherServer, wait_for

pytestmark = pytest.mark.e2e

agent = load_agent()
# From "online" to a reachable check: the certificate is queued at registration, so the
# first poll brings it. Generous for a loaded 2-core CI machine; it takes well under 1 s.
REACHABLE_WITHIN = 5


class StatusFleet(Fleet):
    def check(self) -> dict:
        status, body = self.api.post(f"/api/agents/{self.agent_id}/check_status/", {})
        assert status == 200, body
        return body

    def wait_reachable(self) -> dict:
        """The first reachable answer within REACHABLE_WITHIN s of the agent coming online."""
        return wait_for(
            lambda: (answer := self.check())["reachable"] and answer,
            timeout=REACHABLE_WITHIN,
            interval=0.1,
            what=f"agent {self.agent_id} reachable by check_status",
        )

    def rpc_port(self) -> int:
        status, body = self.api.get(f"/api/agents/{self.agent_id}/")
        assert status == 200, body
        return body["rpc_port"]

    def log(self) -> str:
        return self.agent_proc.log.read_text()


@pytest.fixture
def fleets(tether: TetherServer, admin_api: Api, tmp_path: Path) -> Iterator[list[StatusFleet]]:
    """Managed hosts made on demand (append to the list); their agents stop afterwards."""
    made: list[StatusFleet] = []
    yield made
    for fleet in made:
        if fleet.agent_proc and fleet.agent_proc.proc.poll() is None:
            fleet.agent_proc.kill(signal.SIGTERM)


def new_fleet(fleets: list[StatusFleet], tether: TetherServer, api: Api, tmp: Path) -> StatusFleet:
    fleet = StatusFleet(tether, api, tmp)
    fleets.append(fleet)
    return fleet


def test_an_agent_started_as_the_readme_says_answers_check_status_within_seconds(
    fleets: list[StatusFleet], tether: TetherServer, admin_api: Api, tmp_path: Path
) -> None:
    fleet = new_fleet(fleets, tether, admin_api, tmp_path)
    fleet.start_agent()  # --server, --server-token, --state-dir (and --kill-grace): no RPC flag

    answer = fleet.wait_reachable()

    assert answer["status"] == "online"
    assert answer["version"] == agent.__version__
    assert "error" not in answer
    status, certificate = fleet.api.post(f"/api/agents/{fleet.agent_id}/update_certificate/", {})
    assert status == 200 and certificate["serial"] and not certificate["pending"], certificate
    port = fleet.rpc_port()
    assert port == agent.DEFAULT_RPC_PORT or "rpc port taken" in fleet.log()
    assert f"rpc endpoint listening port={port}" in fleet.log()


def test_two_agents_on_one_host_both_answer_on_ports_of_their_own(
    fleets: list[StatusFleet], tether: TetherServer, admin_api: Api, tmp_path: Path
) -> None:
    first = new_fleet(fleets, tether, admin_api, tmp_path)
    first.start_agent()
    second = new_fleet(fleets, tether, admin_api, tmp_path)
    second.start_agent()  # wants the default port too, which the first (or another) holds

    assert first.wait_reachable()["reachable"] is True
    assert second.wait_reachable()["reachable"] is True

    first_port, second_port = first.rpc_port(), second.rpc_port()
    assert first_port != second_port
    assert first_port == agent.DEFAULT_RPC_PORT or "rpc port taken" in first.log()
    assert "rpc port taken; using a port the OS chose" in second.log()
    assert f"rpc endpoint listening port={second_port}" in second.log()


def test_an_agent_without_rpc_is_reported_as_having_no_endpoint(
    fleets: list[StatusFleet], tether: TetherServer, admin_api: Api, tmp_path: Path
) -> None:
    fleet = new_fleet(fleets, tether, admin_api, tmp_path)
    fleet.start_agent(extra=("--no-rpc",))
    began = time.monotonic()

    answer = fleet.check()

    assert time.monotonic() - began < 2  # nothing to dial: answered at once
    assert answer["reachable"] is False
    assert answer["status"] == "online"  # no endpoint says nothing against a fresh heartbeat
    assert "no RPC endpoint" in answer["error"], answer
    assert fleet.rpc_port() == 0
    status, certificate = fleet.api.post(f"/api/agents/{fleet.agent_id}/update_certificate/", {})
    assert status == 200 and certificate["serial"] is None, certificate
    assert "rpc endpoint" not in fleet.log()
