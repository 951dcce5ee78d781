"""An agent whose clock is off by more than the signature window, in the past or the future:
its signed requests are refused at first, it signs with the server's time (from the 401's
`Date`) from then on, and its work runs once and ends right."""

from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import Fleet, wait_for
from tests.faults.conftest import (
    assert_output,
    fault_survived,
    gated,
    numbered,
    runs,
    start_agent,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

SKEWED_AGENT = Path(__file__).with_name("skewed_agent.py")


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# TETHER_SIGNATURE_WINDOW is 300 s into the past, TETHER_SIGNATURE_FUTURE 30 s ahead.
@pytest.mark.parametrize("skew", [-400, 120])
def test_an_agent_with_a_skewed_clock_recovers_and_runs_its_work_once(
    fault_fleet: Fleet, tmp_path: Path, skew: int
) -> None:
    agent = start_agent(
        fault_fleet, agent_file=SKEWED_AGENT, env={"TETHER_TEST_CLOCK_SKEW": str(skew)}
    )
    assert "signing with its time" in agent.log.read_text()
    marker, gate = tmp_path / "runs.txt", tmp_path / "gate"
    # Long enough to be seen running (and outlive a wrong report deadline, if one is derived
    # from the agent's clock), short enough to be quick.
    command = fault_fleet.send(gated(marker, [("x", 20), ("y", 20)], [gate]))
    wait_for(lambda: fault_fleet.command(command["id"])["status"] == "running", what="running")
    gate.touch()
    done = fault_fleet.wait_final(command["id"])

    assert done["status"] == "succeeded", done
    assert_output(fault_fleet.server, command["id"], numbered("x", 1, 20) + numbered("y", 1, 20))
    assert runs(marker) == 1
    # The agent's times are on the server's clock, not its own skewed one.
    assert abs(seconds(done["started_at"]) - seconds(done["delivered_at"])) < 30, done
    fault_survived()
