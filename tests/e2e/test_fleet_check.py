"""A fleet-wide status check: every target's reachability, asked concurrently."""

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Api, TetherServer
from tests.e2e.test_agent_rpc import RpcFleet

pytestmark = pytest.mark.e2e


def test_it_reports_every_target_and_waits_only_as_long_as_the_slowest(
    tether: TetherServer, admin_api: Api, tmp_path: Path
) -> None:
    for n in range(3):
        (tmp_path / str(n)).mkdir()
    fleets = [RpcFleet(tether, admin_api, tmp_path / str(n), max_concurrent=1) for n in range(3)]
    try:
        stopped = fleets[2]
        stopped.agent_proc.kill(signal.SIGTERM)
        ids = [fleet.agent_id for fleet in fleets]

        began = time.monotonic()
        status, body = admin_api.post("/api/agents/check_status/", {"targets": {"agents": ids}})
        took = time.monotonic() - began

        assert status == 200, body
        assert body["counts"] == {"total": 3, "reachable": 2, "unreachable": 1}
        by_agent = {row["agent"]: row for row in body["results"]}
        for fleet in fleets[:2]:
            assert by_agent[fleet.agent_id]["reachable"] is True, by_agent[fleet.agent_id]
            assert by_agent[fleet.agent_id]["status"] == "online"
        assert by_agent[stopped.agent_id]["reachable"] is False
        assert "refused" in by_agent[stopped.agent_id]["error"]
        assert took < 4  # concurrently: about one RPC timeout (3 s) at most, not three
    finally:
        for fleet in fleets:
            if fleet.agent_proc.proc.poll() is None:
                fleet.agent_proc.kill(signal.SIGTERM)
