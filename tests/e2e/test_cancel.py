"""Cancel: queued at once, running killed by the agent within 2 s, finished -> 409."""

import random
import time

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
