"""Agent SIGKILL mid-command, restarted on the same state dir: the journal says the command
started, so it is never run again; the restarted agent kills what is left of it and reports
it `lost` with the output it had spooled (docs/agent-protocol.md, "Delivery rules")."""

import signal
from pathlib import Path

import pytest

from tests.conftest import Fleet, processes_matching, wait_for
from tests.faults.conftest import (
    assert_output,
    fault_survived,
    gated,
    numbered,
    runs,
    start_agent,
    stored_output,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def test_agent_sigkill_mid_command_runs_it_once_and_reports_it_lost(
    fault_fleet: Fleet, tmp_path: Path
) -> None:
    agent = start_agent(fault_fleet)
    marker, gate = tmp_path / "runs.txt", tmp_path / "never-opened"
    command = fault_fleet.send(gated(marker, [("before", 50), ("after", 50)], [gate]))
    wait_for(
        lambda: stored_output(fault_fleet.server, command["id"]) == numbered("before", 1, 50),
        what="the output before the kill stored",
    )
    assert processes_matching(str(gate)), "the command should still be running"

    agent.kill(signal.SIGKILL)
    agent.start()  # same state dir

    done = fault_fleet.wait_final(command["id"], timeout=30)
    assert done["status"] == "lost", done
    assert "agent restarted" in done["error"]
    assert_output(fault_fleet.server, command["id"], numbered("before", 1, 50))
    wait_for(lambda: not processes_matching(str(gate)), timeout=10, what="the orphan killed")
    # The agent goes on: the next command runs, and the first has still run once.
    follow = fault_fleet.run("echo next")
    assert follow["status"] == "succeeded" and follow["stdout"] == "next\n", follow
    assert runs(marker) == 1
    fault_survived()
