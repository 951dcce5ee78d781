"""The long-poll: held while there is nothing to do, answered as soon as there is, and cheap
to hold (a coroutine, not a thread)."""

import os
import threading
import time
import uuid

from tests.conftest import Api, Fleet, TetherServer, wait_for


def register(tether: TetherServer, server_token: str) -> tuple[int, Api]:
    status, body = Api(tether.url).post(
        "/api/agents/register/",
        {"server_token": server_token, "hostname": f"poller-{uuid.uuid4().hex[:8]}"},
    )
    assert status == 201, body
    return body["agent_id"], Api(tether.url, {"X-Agent-Token": body["token"]})


def polled(tether: TetherServer, *agent_ids: int) -> bool:
    """Every poll has reached the server (a poll's first step records its heartbeat)."""
    marks = ",".join("?" * len(agent_ids))
    rows = tether.sql(
        f"SELECT COUNT(*) FROM fleet_agent WHERE id IN ({marks}) AND last_heartbeat IS NOT NULL",
        *agent_ids,
    )
    return rows[0][0] == len(agent_ids)


def test_a_held_poll_answers_as_soon_as_a_command_is_queued(
    tether: TetherServer, admin_api: Api, tmp_path
) -> None:
    fleet = Fleet(tether, admin_api, tmp_path)
    agent_id, agent = register(tether, fleet.server_token)
    answer: dict = {}

    started = time.perf_counter()
    # Nothing queued: the poll is held for its whole wait.
    assert agent.get("/api/agents/poll/?wait=1")[1]["commands"] == []
    assert time.perf_counter() - started >= 1.0

    tether.sql("UPDATE fleet_agent SET last_heartbeat = NULL WHERE id = ?", agent_id)

    def poll() -> None:
        answer["body"] = agent.get("/api/agents/poll/?wait=2")[1]
        answer["at"] = time.perf_counter()

    poller = threading.Thread(target=poll)
    poller.start()
    wait_for(lambda: polled(tether, agent_id), what="the poll held by the server")
    sent = time.perf_counter()
    command = fleet.send_to(agent_id, "true")
    poller.join(timeout=10)
    assert [c["id"] for c in answer["body"]["commands"]] == [command["id"]]
    assert answer["at"] - sent < 0.5


def test_held_polls_cost_no_threads(tether: TetherServer, admin_api: Api, tmp_path) -> None:
    fleet = Fleet(tether, admin_api, tmp_path)
    pollers = [register(tether, fleet.server_token) for _ in range(40)]
    threads = [
        threading.Thread(target=api.get, args=("/api/agents/poll/?wait=2",)) for _, api in pollers
    ]
    before = len(os.listdir(f"/proc/{tether.proc.pid}/task"))
    for thread in threads:
        thread.start()
    wait_for(lambda: polled(tether, *(agent_id for agent_id, _ in pollers)), what="40 polls in")
    during = len(os.listdir(f"/proc/{tether.proc.pid}/task"))
    for thread in threads:
        thread.join(timeout=10)
    assert during <= before + 2, (before, during)
