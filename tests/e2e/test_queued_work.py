"""Queued work, end to end: a command for an agent that never comes ends `expired`, and a
command waiting in a busy agent's local queue is handed out once (not at every lease), yet
again if the agent loses it."""

import json
import signal
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_PASSWORD, AgentProcess, Api, Fleet, TetherServer, wait_for
from tests.e2e.test_compat import LegacyAgent

pytestmark = pytest.mark.e2e

EXPIRE = 3  # seconds a command may wait in the queue
LEASE = 2  # seconds a delivered, unacknowledged command is held for its agent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherServer]:
    env = {
        "TETHER_COMMAND_EXPIRE": str(EXPIRE),
        "TETHER_COMMAND_LEASE": str(LEASE),
        "TETHER_SWEEP_INTERVAL": "0.3",
        "TETHER_POLL_RECHECK": "0.3",
        # A long-poll of 2 s (capped at 2 heartbeats): a held command's lease runs 4 s past
        # the agent's last poll, so a lost one comes back quickly.
        "TETHER_LONG_POLL_TIMEOUT": "3",
    }
    tether = TetherServer(tmp_path_factory.mktemp("tether-queue"), env).setup().start()
    yield tether
    tether.kill(signal.SIGTERM)


@pytest.fixture
def api(server: TetherServer) -> Api:
    return server.login("admin", ADMIN_PASSWORD)


def status_of(fleet: Fleet, command_id: int) -> str:
    return fleet.command(command_id)["status"]


def events(api: Api, path: str, timeout: float = 20) -> list[tuple[str, dict]]:
    """An SSE stream as (event, data) pairs, up to and including `end`."""
    request = urllib.request.Request(f"{api.base}{path}", headers=api.headers)
    seen: list[tuple[str, dict]] = []
    name = ""
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                seen.append((name, json.loads(line[len("data: ") :])))
                if name == "end":
                    return seen
    raise AssertionError(f"{path} closed without `end`: {seen[-3:]}")


def test_a_command_for_an_agent_that_never_polls_expires_and_its_stream_ends(
    server: TetherServer, api: Api, tmp_path: Path
) -> None:
    fleet = Fleet(server, api, tmp_path)
    fleet.agent_id = LegacyAgent(server, fleet.server_token).id  # registered, never polls
    sent = fleet.send("echo never")

    end = events(api, f"/api/commands/{sent['id']}/stream/")[-1]

    assert end[1]["status"] == "expired", end
    command = fleet.command(sent["id"])
    assert command["status"] == "expired" and command["finished_at"], command
    assert command["delivered_at"] is None


def test_a_run_counts_expired_targets_against_max_errors(
    server: TetherServer, api: Api, tmp_path: Path
) -> None:
    absent = []
    for n in range(3):
        fleet = Fleet(server, api, tmp_path / str(n))
        absent.append(LegacyAgent(server, fleet.server_token).id)
    status, run = api.post(
        "/api/runs/",
        {
            "command": "echo hi",
            "targets": {"agents": absent},
            "offline": "wait",
            "max_concurrency": 1,
            "max_errors": 0,
        },
    )
    assert status == 201, run

    stream = events(api, f"/api/runs/{run['id']}/stream/")

    end = stream[-1][1]
    assert end["status"] == "failed", end
    assert end["counts"]["expired"] == 1 and end["counts"]["cancelled"] == 2, end
    assert "max_errors (0) exceeded" in end["reason"]
    assert any(e == "status" and d["status"] == "expired" for e, d in stream), stream


def test_a_held_command_is_delivered_once_and_a_lost_one_again(
    server: TetherServer, api: Api, tmp_path: Path
) -> None:
    fleet = Fleet(server, api, tmp_path)
    state = Path(tempfile.mkdtemp(prefix="agent-", dir=tmp_path))
    marks = tmp_path / "marks"
    agent = AgentProcess(
        server, fleet.server_token, state, extra=("--max-concurrent", "1", "--no-rpc")
    ).start()
    fleet.agent_id = fleet.wait_online()["id"]

    # One long command holds the only worker; three more wait in the agent's local queue
    # for longer than several leases.
    long = fleet.send(f"echo long >> {marks}; sleep 6")
    wait_for(lambda: status_of(fleet, long["id"]) == "running", what="the long command running")
    queued = [fleet.send(f"echo {n} >> {marks}")["id"] for n in range(3)]
    for command_id in [long["id"], *queued]:
        assert fleet.wait_final(command_id, timeout=30)["status"] == "succeeded"

    deliveries = dict(
        server.sql(
            "SELECT id, delivery_count FROM commands_command WHERE id IN (?, ?, ?, ?)",
            long["id"],
            *queued,
        )
    )
    assert deliveries == {pk: 1 for pk in [long["id"], *queued]}, deliveries
    assert sorted(marks.read_text().split()) == ["0", "1", "2", "long"]

    # Killed while it holds queued commands, and restarted without their journal entries
    # (lost): each is handed out again once its lease runs out, and runs once.
    marks.unlink()
    long = fleet.send(f"echo long >> {marks}; sleep 30")
    wait_for(lambda: status_of(fleet, long["id"]) == "running", what="the long command running")
    queued = [fleet.send(f"echo {n} >> {marks}")["id"] for n in range(3)]
    journal = state / "commands"

    def accepted() -> bool:
        entries = [journal / f"{pk}.json" for pk in queued]
        return all(e.exists() and json.loads(e.read_text())["state"] == "accepted" for e in entries)

    wait_for(accepted, what="the three commands in the agent's local queue")
    agent.kill()
    for pk in queued:
        (journal / f"{pk}.json").unlink()
    agent.start()

    assert fleet.wait_final(long["id"], timeout=30)["status"] == "lost"
    for command_id in queued:
        assert fleet.wait_final(command_id, timeout=30)["status"] == "succeeded"
    deliveries = dict(
        server.sql("SELECT id, delivery_count FROM commands_command WHERE id IN (?, ?, ?)", *queued)
    )
    assert deliveries == {pk: 2 for pk in queued}, deliveries
    assert sorted(marks.read_text().split()) == ["0", "1", "2", "long"]
    agent.kill(signal.SIGTERM)
