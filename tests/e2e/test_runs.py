"""Runs end to end (docs/runs.md): a real server and twenty real agent processes.

Every agent registers from the same machine, so all of them report the same hostname (one
managed server each keeps them apart). A target's command therefore prints `$PPID`, the pid
of the agent process that started its shell: that tells each target's output apart.
"""

import contextlib
import json
import random
import subprocess
import sys
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    AGENT,
    AgentProcess,
    Api,
    Fleet,
    TetherServer,
    processes_matching,
    wait_for,
)

pytestmark = pytest.mark.e2e

AGENTS = 20


@dataclass
class Crowd:
    """Twenty online agents, one per managed server, all tagged `tag`."""

    tether: TetherServer
    api: Api
    tag: str
    pids: dict[int, int]  # agent id -> pid of its agent process ($PPID of its commands)

    @property
    def ids(self) -> list[int]:
        return sorted(self.pids)


def rpc_off() -> tuple[str, ...]:
    """`--no-rpc` where the agent has the flag (RPC on by default is landing); an agent
    without it serves no RPC unless given --rpc-port."""
    usage = subprocess.run(
        [sys.executable, str(AGENT), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    return ("--no-rpc",) if "--no-rpc" in usage else ()


@pytest.fixture(scope="module")
def crowd(
    tether: TetherServer, admin_api: Api, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Crowd]:
    """Start the twenty agents at once and wait for all of them online, with one deadline."""
    tmp = tmp_path_factory.mktemp("crowd")
    extra = rpc_off()
    fleets = [Fleet(tether, admin_api, tmp) for _ in range(AGENTS)]
    processes = {
        fleet.server_id: AgentProcess(
            tether,
            fleet.server_token,
            Path(tempfile.mkdtemp(prefix="agent-", dir=tmp)),
            extra=extra,
        ).start()
        for fleet in fleets
    }
    marks = ",".join("?" * len(processes))

    def all_online() -> list[tuple[int, int]] | None:
        rows = tether.sql(
            f"SELECT id, server_id FROM fleet_agent WHERE server_id IN ({marks}) "
            "AND status = 'online'",
            *processes,
        )
        return rows if len(rows) == AGENTS else None

    try:
        rows = wait_for(all_online, timeout=40, interval=0.1, what=f"{AGENTS} agents online")
        tag = f"crowd-{uuid.uuid4().hex[:8]}"
        for agent_id, _ in rows:
            status, body = admin_api.request("PATCH", f"/api/agents/{agent_id}/", {"tags": [tag]})
            assert status == 200, body
        pids = {agent_id: processes[server_id].proc.pid for agent_id, server_id in rows}
        yield Crowd(tether=tether, api=admin_api, tag=tag, pids=pids)
    finally:
        for process in processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.proc.terminate()
        for process in processes.values():
            process.proc.wait(timeout=15)


# ---------------------------------------------------------------------------------------------
# Helpers: runs as a user sees them
# ---------------------------------------------------------------------------------------------


def start_run(api: Api, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict:
    status, run = api.post("/api/runs/", body, headers=headers)
    assert status == 201, run
    return run


def read_run(api: Api, run_id: int) -> dict:
    status, run = api.get(f"/api/runs/{run_id}/")
    assert status == 200, run
    return run


def wait_run_over(api: Api, run_id: int, timeout: float = 20) -> dict:
    return wait_for(
        lambda: (run := read_run(api, run_id))["status"] != "running" and run,
        timeout=timeout,
        what=f"run {run_id} over",
    )


def follow(api: Api, run_id: int, timeout: float = 30) -> list[tuple[str, dict]]:
    """The run's SSE stream as (event, data) pairs, up to and including `end`."""
    request = urllib.request.Request(f"{api.base}/api/runs/{run_id}/stream/", headers=api.headers)
    events: list[tuple[str, dict]] = []
    name = ""
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
                if name == "end":
                    return events
    raise AssertionError(f"the stream of run {run_id} closed without `end`: {events[-3:]}")


def moment(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """Sweep line: the most intervals open at one instant (an end before a start at a tie)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, step in edges:
        open_now += step
        peak = max(peak, open_now)
    return peak


def queued_anywhere(tether: TetherServer) -> tuple:
    """How many runs and commands the server holds, and the newest command's id."""
    return (
        *tether.sql("SELECT COUNT(*) FROM commands_run")[0],
        *tether.sql("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM commands_command")[0],
    )


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


def test_a_window_of_five_never_runs_more_than_five_and_every_output_arrives(
    crowd: Crowd,
) -> None:
    run = start_run(
        crowd.api,
        {
            "command": "echo start-$PPID; sleep 0.5; echo end-$PPID",
            "targets": {"tags": [crowd.tag]},
            "max_concurrency": 5,
        },
    )
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(follow, crowd.api, run["id"])
        done = wait_run_over(crowd.api, run["id"], timeout=30)
        events = stream.result(timeout=30)

    assert done["status"] == "succeeded", done
    assert done["counts"]["succeeded"] == AGENTS
    targets = done["targets"]
    assert sorted(t["agent"] for t in targets) == crowd.ids
    intervals = [(moment(t["started_at"]), moment(t["finished_at"])) for t in targets]
    # Never more than the window, and the window was used (not one after another).
    assert most_at_once(intervals) == 5
    expected = {
        t["command"]: f"start-{crowd.pids[t['agent']]}\nend-{crowd.pids[t['agent']]}\n"
        for t in targets
    }
    for target in targets:
        status, command = crowd.api.get(f"/api/commands/{target['command']}/")
        assert status == 200, command
        assert (command["stdout"], command["stderr"]) == (expected[target["command"]], "")
        assert command["run"] == run["id"]

    # The stream: each target's output once, in order, under its own agent and hostname.
    by_command = {t["command"]: t for t in targets}
    received: dict[tuple[int, str], str] = {}
    for name, data in events:
        if name in ("output", "status"):
            target = by_command[data["command"]]
            assert (data["agent"], data["hostname"]) == (target["agent"], target["hostname"])
        if name == "output":
            key = (data["command"], data["stream"])
            so_far = received.get(key, "")
            assert data["offset"] == len(so_far.encode()), (data, so_far)
            received[key] = so_far + data["data"]
        if name == "counts":
            assert data["counts"]["running"] <= 5, data
    assert received == {(command, "stdout"): text for command, text in expected.items()}
    last_status = {data["command"]: data for name, data in events if name == "status"}
    assert {(s["status"], s["exit_code"]) for s in last_status.values()} == {("succeeded", 0)}
    assert len(last_status) == AGENTS
    name, end = events[-1]
    assert name == "end"
    assert (end["id"], end["status"], end["counts"]["succeeded"]) == (
        run["id"],
        "succeeded",
        AGENTS,
    )


def test_past_max_errors_the_targets_not_started_are_cancelled(crowd: Crowd) -> None:
    run = start_run(
        crowd.api,
        {
            "command": "echo failing-$PPID; exit 3",
            "targets": {"agents": crowd.ids[:8]},
            "max_concurrency": 2,
            "max_errors": 2,
        },
    )
    done = wait_run_over(crowd.api, run["id"])

    assert done["status"] == "failed"
    failed = [t for t in done["targets"] if t["status"] == "failed"]
    cancelled = [t for t in done["targets"] if t["status"] == "cancelled"]
    # The third failure passes max_errors; with two at a time, one more may have been running.
    assert 3 <= len(failed) <= 4 and len(failed) + len(cancelled) == 8, done["targets"]
    assert {t["exit_code"] for t in failed} == {3}
    # One handed out in the window as the limit passed is asked to cancel, as a running one
    # would be (its agent may have started it); every other was cancelled unstarted.
    asked = [t for t in cancelled if "max_errors" not in (t["error"] or "")]
    assert len(asked) <= 1, asked
    unstarted = [t for t in cancelled if t not in asked]
    for target in unstarted:
        assert target["started_at"] is None, target
        status, command = crowd.api.get(f"/api/commands/{target['command']}/")
        assert command["stdout"] == "" and command["status"] == "cancelled", command
    assert done["reason"] == (
        f"max_errors (2) exceeded: 3 targets failed; {len(unstarted)} not started were cancelled"
    )
    assert (done["counts"]["failed"], done["counts"]["cancelled"]) == (len(failed), len(cancelled))


def test_a_retried_post_with_one_idempotency_key_creates_one_run(crowd: Crowd) -> None:
    body = {"command": "echo once-$PPID", "targets": {"agents": crowd.ids[8:11]}}
    before = queued_anywhere(crowd.tether)
    key = f"retry-{uuid.uuid4().hex}"
    headers = {"Idempotency-Key": key}
    both_ready = threading.Barrier(2)

    def post() -> tuple[int, Any]:
        both_ready.wait(timeout=10)
        return crowd.api.post("/api/runs/", body, headers=headers)

    with ThreadPoolExecutor(2) as pool:
        answers = [future.result(timeout=30) for future in [pool.submit(post) for _ in "ab"]]
    retried = crowd.api.post("/api/runs/", body, headers=headers)

    assert sorted(status for status, _ in answers) == [200, 201], answers
    run_id = answers[0][1]["id"]
    assert answers[1][1]["id"] == run_id
    assert retried[0] == 200 and retried[1]["id"] == run_id
    runs, commands, _ = queued_anywhere(crowd.tether)
    assert (runs, commands) == (before[0] + 1, before[1] + 3)
    done = wait_run_over(crowd.api, run_id)
    assert done["status"] == "succeeded" and done["counts"]["total"] == 3
    outputs = {
        crowd.api.get(f"/api/commands/{t['command']}/")[1]["stdout"] for t in done["targets"]
    }
    assert outputs == {f"once-{crowd.pids[agent]}\n" for agent in crowd.ids[8:11]}
    # The same key for another request is refused, and creates nothing either.
    status, error = crowd.api.post("/api/runs/", {**body, "command": "id"}, headers=headers)
    assert status == 409 and error["error"]["code"] == "idempotency_key_reused", error
    assert queued_anywhere(crowd.tether)[:2] == (before[0] + 1, before[1] + 3)


def test_bad_input_is_refused_clearly_and_queues_nothing(crowd: Crowd, tmp_path: Path) -> None:
    # Bob is no staff member (staff may target anyone's agents): the crowd is someone else's.
    tether = crowd.tether
    bob = tether.create_user(f"bob-{uuid.uuid4().hex[:6]}", "bob-password-1")
    bobs_hostname = f"bobs-{uuid.uuid4().hex[:6]}"
    status, registered = Api(tether.url).post(
        "/api/agents/register/",
        {"server_token": Fleet(tether, bob, tmp_path).server_token, "hostname": bobs_hostname},
    )
    assert status == 201, registered
    bobs_agent = Api(tether.url, {"X-Agent-Token": registered["token"]})
    assert bobs_agent.get("/api/agents/poll/?wait=0")[0] == 200  # online, polling
    bobs_empty_server = Fleet(tether, bob, tmp_path).server_id
    status, bobs_template = bob.post(
        "/api/agents/command-templates/",
        {
            "name": f"restart-{uuid.uuid4().hex[:6]}",
            "command": "echo restarting {unit}",
            "parameters": [{"name": "unit", "type": "string"}],
        },
    )
    assert status == 201, bobs_template
    theirs = crowd.api.get(f"/api/agents/{crowd.ids[0]}/")[1]
    ours = [registered["agent_id"]]
    good = {"command": f"echo must-not-run-{uuid.uuid4().hex}", "targets": {"agents": ours}}
    cases: list[tuple[dict, int, str, str]] = [
        # body, status, field, words the message must hold
        ({**good, "targets": {"tags": ["no-such-tag"]}}, 400, "targets", "no-such-tag"),
        ({**good, "targets": {}}, 400, "targets", "at least one"),
        ({**good, "targets": {"servers": [bobs_empty_server]}}, 400, "targets", "no agent"),
        ({**good, "max_concurrency": 0}, 400, "max_concurrency", "from 1 to"),
        ({**good, "max_errors": -1}, 400, "max_errors", "from 0 to"),
        (
            {"template": bobs_template["id"], "params": {}, "targets": {"agents": ours}},
            400,
            "params",
            "unit",
        ),
        (
            {**good, "targets": {"agents": [*ours, theirs["id"]]}},
            404,
            "",
            f"No such agent: {theirs['id']}",
        ),
        (
            {**good, "targets": {"agents": [bobs_hostname, theirs["hostname"]]}},
            404,
            "",
            f"No such agent: {theirs['hostname']}",
        ),
        (
            {**good, "targets": {"agents": ours, "servers": [theirs["server"]]}},
            404,
            "",
            f"No such server: {theirs['server']}",
        ),
    ]
    before = queued_anywhere(tether)
    for body, expected_status, field, words in cases:
        status, answer = bob.post("/api/runs/", body)
        assert status == expected_status, (body, answer)
        error = answer["error"]
        assert words in error["message"], (body, error)
        if field:
            assert error["code"] == "invalid" and field in error["fields"], (body, error)
            assert error["message"].startswith(f"{field}:"), (body, error)
        else:
            assert error["code"] == "not_found", (body, error)

    assert queued_anywhere(tether) == before
    # Nothing reached any agent: no command row exists for one to be handed, and Bob's asks.
    status, polled = bobs_agent.get("/api/agents/poll/?wait=0")
    assert status == 200 and polled["commands"] == [], polled
    assert bob.get("/api/runs/")[1]["count"] == 0


def test_cancelling_a_run_kills_what_runs_and_cancels_the_rest(crowd: Crowd) -> None:
    marker = f"300.{random.randint(100000, 999999)}"
    run = start_run(
        crowd.api,
        {
            "command": f"sleep {marker}",
            "targets": {"agents": crowd.ids[11:17]},
            "max_concurrency": 3,
        },
    )
    wait_for(
        lambda: read_run(crowd.api, run["id"])["counts"]["running"] == 3,
        what="three targets running",
    )
    wait_for(lambda: len(processes_matching(f"sleep {marker}")) == 3, what="three sleeps")

    status, answer = crowd.api.post(f"/api/runs/{run['id']}/cancel/")

    assert status == 202, answer
    assert answer["reason"] == "cancelled by admin"
    # Not started: cancelled at once, in the answer itself. Running: the agents are asked (one
    # may already have answered by the time the answer is written).
    not_started = [t for t in answer["targets"] if t["started_at"] is None]
    assert [t["status"] for t in not_started] == ["cancelled"] * 3, answer["targets"]
    started = [t for t in answer["targets"] if t["started_at"] is not None]
    assert len(started) == 3 and {t["status"] for t in started} <= {"running", "cancelled"}
    done = wait_run_over(crowd.api, run["id"], timeout=10)
    assert done["status"] == "cancelled" and done["reason"] == "cancelled by admin"
    assert {t["status"] for t in done["targets"]} == {"cancelled"}
    killed = [t for t in done["targets"] if t["started_at"] is not None]
    assert len(killed) == 3 and all(t["finished_at"] for t in killed), done["targets"]
    wait_for(lambda: not processes_matching(f"sleep {marker}"), timeout=5, what="sleeps gone")
    assert read_run(crowd.api, run["id"])["counts"]["cancelled"] == 6
