"""Crashes lose nothing and double nothing: server SIGKILL mid-stream, agent SIGKILL
mid-command, and the same command delivered twice."""

import signal
from pathlib import Path

import pytest

from tests.conftest import ADMIN_PASSWORD, Fleet, TetherServer, processes_matching, wait_for

# ~100k lines over a few seconds, so the server can be killed while it streams.
SLOW_SEQ = "seq 1 100000 | awk '{print} NR % 2000 == 0 {system(\"sleep 0.05\")}'"


@pytest.fixture
def own_server(tmp_path: Path):
    server = TetherServer(tmp_path / "data").setup()
    server.start()
    yield server
    server.kill()


def test_server_kill_mid_stream_loses_and_doubles_nothing(
    own_server: TetherServer, tmp_path: Path
) -> None:
    fleet = Fleet(own_server, own_server.login("admin", ADMIN_PASSWORD), tmp_path)
    fleet.start_agent()
    command = fleet.send(SLOW_SEQ, timeout=120)
    wait_for(
        lambda: fleet.command(command["id"])["stdout"].count("\n") > 5000,
        what="part of the output stored",
    )
    own_server.kill(signal.SIGKILL)
    own_server.start()
    done = fleet.wait_final(command["id"], timeout=60)
    assert done["status"] == "succeeded"
    assert done["stdout"] == "".join(f"{i}\n" for i in range(1, 100001))


def test_agent_kill_mid_command_ends_lost_and_ran_once(fleet: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "runs.txt"
    command = fleet.send(f"echo run >> {marker}; sleep 123.456; echo done")
    wait_for(
        lambda: marker.exists() and fleet.command(command["id"])["status"] == "running",
        what="command running",
    )
    fleet.agent_proc.kill(signal.SIGKILL)
    fleet.agent_proc.start()
    done = fleet.wait_final(command["id"], timeout=30)
    assert done["status"] in ("lost", "failed")
    assert marker.read_text() == "run\n"
    wait_for(
        lambda: not processes_matching("sleep 123.456"),
        timeout=10,
        what="the orphaned command killed by the restarted agent",
    )


def test_a_command_delivered_twice_runs_once(fleet: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "runs.txt"
    command = fleet.send(f"echo run >> {marker}; sleep 3")
    wait_for(lambda: fleet.command(command["id"])["status"] == "running", what="running")
    # As if the agent's acknowledgement was lost: the server hands the command out again.
    fleet.server.sql("UPDATE commands_command SET status = 'queued' WHERE id = ?", command["id"])
    wait_for(
        lambda: (
            fleet.server.sql(
                "SELECT delivery_count FROM commands_command WHERE id = ?", command["id"]
            )[0][0]
            >= 2
        ),
        what="second delivery",
    )
    done = fleet.wait_final(command["id"], timeout=30)
    assert done["status"] == "succeeded"
    assert marker.read_text() == "run\n"


def test_an_agent_that_stays_away_goes_offline_and_its_command_is_lost(fleet: Fleet) -> None:
    command = fleet.send("sleep 60.789")
    wait_for(lambda: fleet.command(command["id"])["status"] == "running", what="running")
    fleet.agent_proc.kill(signal.SIGKILL)
    # Fast timers: offline after 3 x 1 s without a heartbeat, lost 1 s later.
    wait_for(
        lambda: fleet.api.get(f"/api/agents/{fleet.agent_id}/")[1]["status"] == "offline",
        timeout=15,
        what="agent offline",
    )
    done = fleet.wait_final(command["id"], timeout=15)
    assert done["status"] == "lost"
    assert "offline" in done["error"]
    # The restarted agent finds the orphan, kills it, and the command stays lost.
    fleet.agent_proc.start()
    fleet.wait_online()
    wait_for(lambda: not processes_matching("sleep 60.789"), timeout=10, what="orphan killed")
    assert fleet.command(command["id"])["status"] == "lost"


def test_the_agent_exits_cleanly_on_sigterm(fleet: Fleet) -> None:
    command = fleet.send("sleep 45.678")
    wait_for(lambda: fleet.command(command["id"])["status"] == "running", what="running")
    fleet.agent_proc.proc.send_signal(signal.SIGTERM)
    assert fleet.agent_proc.proc.wait(timeout=15) == 0
    done = fleet.wait_final(command["id"], timeout=10)
    assert done["status"] == "failed"
    assert "agent stopped" in done["error"]
    assert not processes_matching("sleep 45.678")
