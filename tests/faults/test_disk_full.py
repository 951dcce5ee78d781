"""The agent's spool disk fills up while a command streams and another is handed out: the
agent keeps running and polling, reports the output it could keep and declares the bytes it
lost (one marker where they were, the count exact), runs nothing it could not journal, and
once space frees runs the held-back command once and spools again."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Fleet, wait_for
from tests.faults.conftest import (
    LEDGER,
    SmallDisk,
    fault_survived,
    gated,
    numbered,
    runs,
    start_agent,
    stored_output,
    stored_runs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

# Part b is far more than a pipe holds (64 KiB): by the time the command is past it, the
# agent has read most of it while the disk was full.
B_LINES = 30000


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "disk")
    yield disk
    disk.free()
    disk.close()


def test_a_full_spool_disk_loses_only_what_could_not_be_kept(
    fault_fleet: Fleet, disk: SmallDisk, tmp_path: Path
) -> None:
    agent = start_agent(fault_fleet, state_dir=disk.path)
    m1, m2 = tmp_path / "first.txt", tmp_path / "second.txt"
    gates = [tmp_path / "gate-b", tmp_path / "gate-c"]
    first = fault_fleet.send(gated(m1, [("a", 50), ("b", B_LINES), ("c", 50)], gates))
    part_a, part_b, part_c = numbered("a", 1, 50), numbered("b", 1, B_LINES), numbered("c", 1, 50)
    wait_for(
        lambda: stored_output(fault_fleet.server, first["id"]) == part_a,
        what="the first part stored",
    )

    disk.fill(agent.proc.pid)
    gates[0].touch()
    wait_for(lambda: Path(f"{gates[1]}.reached").exists(), what="the command past part b")
    # Handed out while the agent cannot journal it: not run, so handed out again at the lease.
    second = fault_fleet.send(f"echo run >> {m2}; echo second")
    deliveries = "SELECT delivery_count FROM commands_command WHERE id = ?"
    wait_for(
        lambda: fault_fleet.server.sql(deliveries, second["id"])[0][0] >= 2,
        what="the second command handed out again",
    )
    assert runs(m2) == 0, "a command the agent could not journal must not run"
    assert agent.proc.poll() is None, "the agent should keep running on a full disk"
    _, read = fault_fleet.api.get(f"/api/agents/{fault_fleet.agent_id}/")
    assert read["status"] == "online", read

    disk.free()
    gates[1].touch()
    done = fault_fleet.wait_final(first["id"])
    again = fault_fleet.wait_final(second["id"])

    assert done["status"] == "succeeded" and done["truncated"], done
    # One hole where the disk was full, at its true place and of its true size (the agent
    # declares it): the bytes around it stored once each, where the command wrote them.
    whole = part_a + part_b + part_c
    (start, head), (resumed, tail) = stored_runs(fault_fleet.server, first["id"])
    hole = resumed - len(head)
    assert start == 0 and whole.startswith(head) and head.startswith(part_a), disk.how
    assert resumed + len(tail) == len(whole) and whole.endswith(tail), disk.how
    assert tail.endswith(part_c) and hole > 64 * 1024, disk.how
    assert done["stdout_dropped"] == hole
    marker = f"\n[... {hole:,} bytes dropped ...]\n"  # the documented form
    assert done["stdout"] == head.decode() + marker + tail.decode()
    LEDGER["bytes_compared"] += len(whole)
    assert again["status"] == "succeeded" and again["stdout"] == "second\n", again
    assert runs(m1) == 1 and runs(m2) == 1
    fault_survived()
