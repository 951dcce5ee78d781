"""Cancel: queued at once, running killed by the agent within 2 s, finished -> 409."""

import random
import time
from datetime import UTC, datetime, timedelta

from tests.conftest import Fleet, processes_matching, wait_for


def test_it_cancels_a_running_command_within_two_seconds(fleet: Fleet) -> None:
    marker = f"300.{random.randint(100000, 999999)}"
    command = fleet.send(f"sleep {marker} & sleep {marker}")
    wait_for(lambda: fleet.command(command["id"])["status"] == "running", what="running")
    wait_for(lambda: processes_matching(f"sleep {marker}"), what="sleep started")
    started = time.monotonic()
    status, _ = fleet.api.post(f"/api/commands/{command['id']}/cancel/")
    assert status == 202
    done = fleet.wait_final(command["id"], timeout=10)
    assert done["status"] == "cancelled"
    assert time.monotonic() - started < 2.0
    wait_for(
        lambda: not processes_matching(f"sleep {marker}"), timeout=3, what="process group gone"
    )


def test_cancelling_a_finished_command_is_a_conflict(fleet: Fleet) -> None:
    command = fleet.run("true")
    status, body = fleet.api.post(f"/api/commands/{command['id']}/cancel/")
    assert status == 409
    assert body["error"]["code"] == "already_final"
    assert fleet.command(command["id"])["status"] == "succeeded"


def test_a_cancel_for_a_command_the_agent_never_received_ends_cancelled(fleet: Fleet) -> None:
    fleet.agent_proc.kill()
    command = fleet.send("echo should-never-run")
    # As if the poll reply carrying it was lost: delivered, with a long lease left.
    fleet.server.sql(
        "UPDATE commands_command SET status = 'delivered', delivery_count = 1, "
        "lease_expires_at = ? WHERE id = ?",
        datetime.now(UTC) + timedelta(hours=1),
        command["id"],
    )
    fleet.agent_proc.start()
    fleet.wait_online()
    status, _ = fleet.api.post(f"/api/commands/{command['id']}/cancel/")
    assert status == 202
    done = fleet.wait_final(command["id"], timeout=15)
    assert done["status"] == "cancelled"
    assert done["stdout"] == ""
