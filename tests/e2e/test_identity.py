"""Two real agents with one server token and the same hostname (issue 13, row 4): before
machine identities they took the identity from each other every ~25 s, each takeover marking
the other's running command lost. Now they are two agents that keep their own."""

import shutil
import tempfile
from pathlib import Path

from tests.conftest import AgentProcess, Fleet, wait_for


def registrations(agent: AgentProcess) -> int:
    return agent.log.read_text().count(" info registered ")


def test_two_agents_with_one_hostname_keep_their_own_identity(fleet: Fleet) -> None:
    first = fleet.agent_proc
    assert first is not None
    long_running = fleet.send("sleep 2; echo first-done")
    state = Path(tempfile.mkdtemp(prefix="agent-", dir=fleet.tmp))
    second = AgentProcess(fleet.server, fleet.server_token, state).start()
    try:

        def both_online() -> list[dict] | None:
            _, body = fleet.api.get(f"/api/agents/?server={fleet.server_id}")
            agents = body["results"]
            online = [a for a in agents if a["status"] == "online"]
            return agents if len(agents) == 2 and len(online) == 2 else None

        agents = wait_for(both_online, timeout=30, what="two agents online")
        assert agents[0]["hostname"] == agents[1]["hostname"]
        other = next(a["id"] for a in agents if a["id"] != fleet.agent_id)

        # Each runs what it is sent, the first one's command is not lost to the second's
        # registration, and several polls later neither has registered again.
        assert fleet.wait_final(long_running["id"])["status"] == "succeeded"
        assert fleet.wait_final(long_running["id"])["stdout"] == "first-done\n"
        for _ in range(3):
            assert fleet.run("echo one")["stdout"] == "one\n"
            done = fleet.wait_final(fleet.send_to(other, "echo two")["id"])
            assert done["stdout"] == "two\n"
        assert registrations(first) == 1
        assert registrations(second) == 1
    finally:
        second.kill()


def test_a_copied_state_dir_registers_as_its_own_machine(fleet: Fleet) -> None:
    """A host cloned with the agent's state dir in it (credentials included) must not share
    the original's identity: the copy notices it is on another machine and registers."""
    first = fleet.agent_proc
    assert first is not None
    copy = Path(tempfile.mkdtemp(prefix="clone-", dir=fleet.tmp)) / "state"
    shutil.copytree(first.state_dir, copy, ignore=shutil.ignore_patterns("agent.log", "*.sock"))
    clone = AgentProcess(fleet.server, fleet.server_token, copy).start()
    try:

        def two_online() -> list[dict] | None:
            _, body = fleet.api.get(f"/api/agents/?server={fleet.server_id}")
            online = [a for a in body["results"] if a["status"] == "online"]
            return online if len(online) == 2 else None

        agents = wait_for(two_online, timeout=30, what="the original and its copy online")
        other = next(a["id"] for a in agents if a["id"] != fleet.agent_id)
        assert fleet.run("echo original")["stdout"] == "original\n"
        assert fleet.wait_final(fleet.send_to(other, "echo copy")["id"])["stdout"] == "copy\n"
        assert registrations(first) == 1
        assert "the state dir comes from another machine" in clone.log.read_text()
    finally:
        clone.kill()
