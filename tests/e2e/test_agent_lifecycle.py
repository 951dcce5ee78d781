"""Upgrade through the agent itself: signed manifest, self-test, atomic swap, re-exec, and
rollback when the new file is not fit to run. Real server, real agent processes."""

import shutil
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import AGENT, FINAL, Api, Fleet, TetherServer, wait_for

pytestmark = pytest.mark.e2e

DEPLOYMENT_FINAL = {"succeeded", "failed", "cancelled"}


def old_agent(directory: Path, version: str = "0.0.1") -> Path:
    """A copy of the agent that says it is an older version, in a directory of its own (an
    upgrade writes beside the running file)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "main.py"
    source = AGENT.read_text()
    # The copy must really say `version`: the agent declares its version on one line of its own.
    declared = [line for line in source.splitlines() if line.startswith("__version__ = ")]
    assert declared == [f'__version__ = "{served_version()}"'], declared
    lines = [
        f'__version__ = "{version}"\n' if line.startswith("__version__ = ") else line
        for line in source.splitlines(keepends=True)
    ]
    path.write_text("".join(lines))
    assert f'\n__version__ = "{version}"\n' in path.read_text()
    return path


def served_version() -> str:
    for line in AGENT.read_text().splitlines():
        if line.startswith("__version__ = "):
            return line.split('"')[1]
    raise AssertionError("no __version__ in agent/main.py")


def wait_deployment(api: Api, deployment_id: int, timeout: float = 60) -> dict:
    def final() -> dict | None:
        status, body = api.get(f"/api/deployments/{deployment_id}/")
        assert status == 200, body
        return body if body["status"] in DEPLOYMENT_FINAL else None

    return wait_for(final, timeout=timeout, what=f"deployment {deployment_id} final")


@pytest.fixture
def old_fleet(tether: TetherServer, admin_api: Api, tmp_path: Path) -> Fleet:
    """A managed host whose agent runs an older copy of the agent file."""
    fleet = Fleet(tether, admin_api, tmp_path)
    fleet.agent_file = old_agent(tmp_path / "install")
    fleet.start_agent(agent_file=fleet.agent_file)
    yield fleet
    if fleet.agent_proc.proc.poll() is None:
        fleet.agent_proc.kill(signal.SIGTERM)


def agent_row(api: Api, agent_id: int) -> dict:
    status, body = api.get(f"/api/agents/{agent_id}/")
    assert status == 200, body
    return body


def test_an_online_agent_upgrades_itself_and_keeps_its_running_command(old_fleet: Fleet) -> None:
    fleet, agent_file, agent_id = old_fleet, old_fleet.agent_file, old_fleet.agent_id
    assert agent_row(fleet.api, agent_id)["version"] == "0.0.1"
    pid = fleet.agent_proc.proc.pid
    # A command that is still running when the upgrade is asked for.
    running = fleet.send("for i in 1 2 3 4 5; do echo line-$i; sleep 0.3; done")
    wait_for(
        lambda: fleet.command(running["id"])["status"] == "running",
        timeout=15,
        what="command running",
    )

    status, body = fleet.api.post(f"/api/agents/{agent_id}/upgrade/")

    assert status == 202, body
    assert body["method"] == "agent"
    deployment = wait_deployment(fleet.api, body["deployment_id"])
    assert deployment["status"] == "succeeded", deployment["log"]
    assert deployment["target_version"] == served_version()
    for step in ("manifest ok", "self-test", "swapped in", "agent online at version"):
        assert step in deployment["log"], deployment["log"]
    agent = agent_row(fleet.api, agent_id)
    assert agent["version"] == served_version()
    assert agent["status"] == "online"
    assert agent_file.read_bytes() == AGENT.read_bytes()
    assert fleet.agent_proc.proc.poll() is None and fleet.agent_proc.proc.pid == pid  # re-exec
    finished = fleet.wait_final(running["id"])
    assert finished["status"] == "succeeded"
    assert finished["stdout"] == "".join(f"line-{i}\n" for i in range(1, 6))
    after = fleet.run("echo after-upgrade")
    assert after["status"] == "succeeded" and after["stdout"] == "after-upgrade\n"


class Release:
    """A server of its own whose served agent file each test writes: a release that is
    broken in one way or another."""

    def __init__(self, directory: Path, server: TetherServer) -> None:
        self.directory = directory
        self.server = server

    def publish(self, version: str, *edits: tuple[str, str]) -> None:
        source = old_agent(self.directory / "build", version=version).read_text()
        for old, new in edits:
            assert old in source, old
            source = source.replace(old, new, 1)
        (self.directory / "main.py").write_text(source)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    directory = tmp_path_factory.mktemp("release")
    shutil.copy(AGENT.parent / "requirements.txt", directory / "requirements.txt")
    server = TetherServer(
        tmp_path_factory.mktemp("tether-release"),
        extra_env={"TETHER_AGENT_DIR": str(directory), "TETHER_DEPLOY_ONLINE_DEADLINE": "4"},
    )
    server.setup().start()
    yield Release(directory, server)
    server.kill(signal.SIGTERM)


@pytest.fixture
def release_fleet(release: Release, tmp_path: Path) -> Fleet:
    from tests.conftest import ADMIN_PASSWORD

    fleet = Fleet(release.server, release.server.login("admin", ADMIN_PASSWORD), tmp_path)
    fleet.agent_file = old_agent(tmp_path / "install")
    fleet.start_agent(agent_file=fleet.agent_file)
    yield fleet
    if fleet.agent_proc.proc.poll() is None:
        fleet.agent_proc.kill(signal.SIGTERM)


def test_a_release_that_fails_its_self_test_leaves_the_agent_as_it_was(
    release: Release, release_fleet: Fleet
) -> None:
    release.publish("9.9.9", ("def self_test():\n", "def self_test():\n    return 1\n"))
    fleet, before = release_fleet, release_fleet.agent_file.read_bytes()

    status, body = fleet.api.post(f"/api/agents/{fleet.agent_id}/upgrade/")

    assert status == 202, body
    deployment = wait_deployment(fleet.api, body["deployment_id"])
    assert deployment["status"] == "failed", deployment["log"]
    assert "--self-test of the new file failed" in deployment["log"]
    assert deployment["target_version"] == "9.9.9"
    assert fleet.agent_file.read_bytes() == before
    agent = fleet.wait_online()
    assert agent["version"] == "0.0.1"
    assert fleet.run("echo still-here")["stdout"] == "still-here\n"


def test_a_release_that_never_reaches_the_server_is_rolled_back(
    release: Release, release_fleet: Fleet
) -> None:
    # Passes --version and --self-test, but once running it never polls the server.
    release.publish(
        "9.9.10",
        (
            "def poll_forever(agent):\n",
            "def poll_forever(agent):\n"
            "    while not agent.stopping.is_set():\n"
            "        confirm_upgrade(agent) if agent.pending_upgrade else None\n"
            "        time.sleep(0.1)\n",
        ),
    )
    fleet, before = release_fleet, release_fleet.agent_file.read_bytes()

    status, body = fleet.api.post(f"/api/agents/{fleet.agent_id}/upgrade/")

    assert status == 202, body
    deployment = wait_deployment(fleet.api, body["deployment_id"], timeout=30)
    assert deployment["status"] == "failed", deployment["log"]
    assert "swapped in version 9.9.10" in deployment["log"]
    # The agent says so itself, while the server still waits (its deadline is twice as long).
    assert deployment["log"].splitlines()[-1] == (
        "rolled back: version 9.9.10 did not reach the server in time; back on version 0.0.1"
    )

    def back_on_the_old_version() -> dict | None:
        agent = agent_row(fleet.api, fleet.agent_id)
        return agent if agent["status"] == "online" and agent["version"] == "0.0.1" else None

    wait_for(back_on_the_old_version, timeout=30, what="the old agent back online")
    assert fleet.agent_file.read_bytes() == before
    assert fleet.agent_proc.proc.poll() is None
    assert fleet.run("echo rolled-back")["stdout"] == "rolled-back\n"


def test_a_second_upgrade_cancels_the_first_and_racing_requests_leave_one_running(
    old_fleet: Fleet,
) -> None:
    fleet, agent_file, agent_id = old_fleet, old_fleet.agent_file, old_fleet.agent_id
    # Hold the agent's only interest on a running command so the first upgrade is still
    # waiting for it when the second one arrives.
    busy = fleet.send("sleep 2")
    wait_for(lambda: fleet.command(busy["id"])["status"] == "running", timeout=15, what="busy")

    _, first = fleet.api.post(f"/api/agents/{agent_id}/upgrade/")
    answers: list[tuple[int, dict]] = []

    def request() -> None:
        answers.append(fleet.api.post(f"/api/agents/{agent_id}/upgrade/"))

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(status in (202, 409) for status, _ in answers), answers
    ids = [body["deployment_id"] for status, body in answers if status == 202]
    assert ids
    _, listed = fleet.api.get(f"/api/agents/{agent_id}/deployments/")
    active = [d for d in listed if d["status"] in ("queued", "running")]
    assert len(active) <= 1, active
    _, first_now = fleet.api.get(f"/api/deployments/{first['deployment_id']}/")
    assert first_now["status"] == "cancelled", first_now["log"]
    assert "superseded" in first_now["log"]
    last = wait_deployment(fleet.api, max(ids))
    assert last["status"] == "succeeded", last["log"]
    for deployment_id in [first["deployment_id"], *ids[:-1]]:
        _, earlier = fleet.api.get(f"/api/deployments/{deployment_id}/")
        assert earlier["status"] == "cancelled", earlier
    assert fleet.wait_final(busy["id"])["status"] in FINAL
    assert agent_row(fleet.api, agent_id)["version"] == served_version()
    assert agent_file.read_bytes() == AGENT.read_bytes()


def test_stop_through_the_agent_leaves_it_stopped_and_its_queued_work_waiting(
    fleet: Fleet,
) -> None:
    status, body = fleet.api.post(f"/api/agents/{fleet.agent_id}/stop/")

    assert status == 202, body
    assert body["method"] == "agent"
    deployment = wait_deployment(fleet.api, body["deployment_id"])
    assert deployment["status"] == "succeeded", deployment["log"]
    assert "stopping the agent" in deployment["log"]
    assert fleet.agent_proc.proc.wait(timeout=15) == 0  # a deliberate stop: exit status 0
    waiting = fleet.send("echo after-the-stop")

    def silent_past_the_offline_threshold() -> dict | None:
        agent = agent_row(fleet.api, fleet.agent_id)
        silent = time.time() - datetime.fromisoformat(agent["last_heartbeat"]).timestamp()
        return agent if silent > 3 * 1 + 1 else None  # FAST_ENV: 1 s heartbeats

    agent = wait_for(silent_past_the_offline_threshold, timeout=15, what="a silent agent")
    assert agent["status"] == "stopped"  # not offline: the sweeper leaves it alone
    assert fleet.command(waiting["id"])["status"] == "queued"
    fleet.agent_proc.start()  # what `start` does over SSH: the same agent, same state dir
    assert fleet.wait_final(waiting["id"])["stdout"] == "after-the-stop\n"
    assert agent_row(fleet.api, fleet.agent_id)["status"] == "online"
