"""The SSH path end to end: a real `tether serve` runs install_agent.yml with ansible-runner
against a real sshd on loopback, and the agents it starts register and poll for real.

Each managed host is a fresh agent directory on this machine, reached as root over the
test sshd; there is no systemd here, so the playbook takes the tether-agentctl path.
"""

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    AGENT,
    AgentProcess,
    Api,
    TetherServer,
    free_port,
    processes_matching,
    wait_for,
)
from tests.e2e.sshd import Sshd, sshd_fixture  # noqa: F401 (provides `sshd`)

pytestmark = pytest.mark.e2e

FINAL = {"succeeded", "failed", "cancelled"}
SERVED_VERSION_LINE = next(
    line for line in AGENT.read_text().splitlines() if line.startswith("__version__")
)


class SshHost:
    """A server in Tether whose host is the test sshd, with an agent dir of its own."""

    def __init__(
        self, tether: TetherServer, api: Api, sshd: Sshd, root: Path, ssh_port: int = 0
    ) -> None:
        self.tether = tether
        self.api = api
        self.agent_dir = root / "opt-tether-agent"
        status, body = api.post(
            "/api/servers/",
            {
                "name": f"ssh-{uuid.uuid4().hex[:8]}",
                "host": "127.0.0.1",
                "ssh_port": ssh_port or sshd.port,
                "ssh_user": "root",
                "ssh_private_key": sshd.client_key.read_text(),
                "agent_dir": str(self.agent_dir),
            },
        )
        assert status == 201, body
        self.server_id = body["id"]
        self.server_token = body["server_token"]

    def request(self, path: str) -> int:
        status, body = self.api.post(path)
        assert status == 202, body
        assert body["method"] == "ssh", body
        return body["deployment_id"]

    def deployment(self, deployment_id: int) -> dict:
        status, body = self.api.get(f"/api/deployments/{deployment_id}/")
        assert status == 200, body
        return body

    def wait_final(self, deployment_id: int, timeout: float = 60) -> dict:
        return wait_for(
            lambda: (d := self.deployment(deployment_id))["status"] in FINAL and d,
            timeout=timeout,
            interval=0.1,
            what=f"deployment {deployment_id} final",
        )

    def server(self) -> dict:
        status, body = self.api.get(f"/api/servers/{self.server_id}/")
        assert status == 200, body
        return body

    def agents(self) -> list[dict]:
        _, body = self.api.get(f"/api/agents/?server={self.server_id}")
        return body["results"]

    def agent(self, agent_id: int) -> dict:
        status, body = self.api.get(f"/api/agents/{agent_id}/")
        assert status == 200, body
        return body

    def agent_pids(self) -> list[int]:
        return processes_matching(f"{self.agent_dir}/main.py")

    def stop_everything(self) -> None:
        """Stop the supervisor and agent the playbook started, by their session."""
        ctl = self.agent_dir / "tether-agentctl"
        if ctl.exists():
            subprocess.run(["/bin/sh", str(ctl), "stop"], capture_output=True, timeout=60)
        pid_file = self.agent_dir / "agentctl.pid"
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        for pid in self.agent_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ssh_host(tether: TetherServer, admin_api: Api, sshd: Sshd, tmp_path: Path) -> Iterator[SshHost]:
    host = SshHost(tether, admin_api, sshd, tmp_path)
    yield host
    host.stop_everything()


@pytest.fixture
def installed(ssh_host: SshHost) -> tuple[SshHost, dict]:
    """A host after an install over SSH, with the log the operator saw while it ran."""
    deployment_id = ssh_host.request(f"/api/servers/{ssh_host.server_id}/install/")
    live: list[bool] = []

    def final() -> dict | None:
        d = ssh_host.deployment(deployment_id)
        live.append(d["status"] == "running" and "TASK [" in d["log"])
        return d if d["status"] in FINAL else None

    d = wait_for(final, timeout=60, interval=0.05, what="install final")
    d["seen_running_with_tasks"] = any(live)
    return ssh_host, d


def test_install_brings_a_new_agent_online_and_records_the_host_key(
    installed: tuple[SshHost, dict], sshd: Sshd
) -> None:
    host, deployment = installed

    assert deployment["status"] == "succeeded", deployment["log"]
    assert deployment["seen_running_with_tasks"], "the log did not show tasks while running"
    for task in ("TASK [Copy main.py]", "TASK [Write the agent config]", "tether-agentctl"):
        assert task in deployment["log"]
    assert "online at version" in deployment["log"].splitlines()[-1]
    (agent,) = host.agents()
    assert agent["status"] == "online"
    assert deployment["agent"] == agent["id"]
    assert (host.agent_dir / "main.py").read_bytes() == AGENT.read_bytes()
    assert (host.agent_dir / "agent.json").stat().st_mode & 0o777 == 0o600
    assert sshd.host_public_key in host.server()["ssh_known_hosts"]
    # The one-time token reached the host, not the log.
    token = json.loads((host.agent_dir / "agent.json").read_text())["server_token"]
    assert token not in deployment["log"]


def test_stop_and_start_over_ssh(installed: tuple[SshHost, dict]) -> None:
    host, _ = installed
    (agent,) = host.agents()
    (pid,) = host.agent_pids()
    # Frozen, the agent is running but silent: the server sees it offline and stops it over SSH.
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: host.agent(agent["id"])["status"] == "offline", what="agent offline")
        stop = host.request(f"/api/agents/{agent['id']}/stop/")
    finally:
        os.kill(pid, signal.SIGCONT)

    stopped = host.wait_final(stop)

    assert stopped["status"] == "succeeded", stopped["log"]
    assert "TASK [tether-agentctl stop]" in stopped["log"]
    assert host.agent(agent["id"])["status"] == "stopped"
    assert not host.agent_pids()
    assert not (host.agent_dir / "agentctl.pid").exists()

    started = host.wait_final(host.request(f"/api/agents/{agent['id']}/start/"))

    assert started["status"] == "succeeded", started["log"]
    assert "TASK [tether-agentctl start]" in started["log"]
    assert host.agent(agent["id"])["status"] == "online"
    assert len(host.agent_pids()) == 1


def test_upgrade_of_an_offline_agent_brings_it_back_at_the_served_version(
    ssh_host: SshHost, tether: TetherServer
) -> None:
    state_dir = ssh_host.agent_dir / "state"
    state_dir.mkdir(parents=True)
    old = ssh_host.agent_dir / "main.py"
    old.write_text(AGENT.read_text().replace(SERVED_VERSION_LINE, '__version__ = "0.0.1"'))
    agent_proc = AgentProcess(tether, ssh_host.server_token, state_dir, agent_file=old).start()
    try:
        (agent,) = wait_for(
            lambda: [a for a in ssh_host.agents() if a["status"] == "online"], what="old online"
        )
    finally:
        agent_proc.kill()
    assert agent["version"] == "0.0.1"
    wait_for(lambda: ssh_host.agent(agent["id"])["status"] == "offline", what="agent offline")

    deployment = ssh_host.wait_final(ssh_host.request(f"/api/agents/{agent['id']}/upgrade/"))

    assert deployment["status"] == "succeeded", deployment["log"]
    served = SERVED_VERSION_LINE.split('"')[1]
    assert deployment["target_version"] == served
    upgraded = ssh_host.agent(agent["id"])
    assert (upgraded["version"], upgraded["status"]) == (served, "online")
    assert [a["id"] for a in ssh_host.agents()] == [agent["id"]], "it registered again"
    assert old.read_bytes() == AGENT.read_bytes()


def test_a_changed_host_key_fails_the_deployment_clearly(
    ssh_host: SshHost, tether: TetherServer, tmp_path: Path
) -> None:
    other_key = tmp_path / "other_host_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True
    )
    recorded = f"[127.0.0.1]:{ssh_host.server()['ssh_port']} " + " ".join(
        other_key.with_suffix(".pub").read_text().split()[:2]
    )
    tether.sql(
        "UPDATE fleet_server SET ssh_known_hosts = ? WHERE id = ?",
        recorded + "\n",
        ssh_host.server_id,
    )
    began = time.monotonic()

    deployment = ssh_host.wait_final(
        ssh_host.request(f"/api/servers/{ssh_host.server_id}/install/"), timeout=45
    )

    assert deployment["status"] == "failed", deployment["log"]
    assert time.monotonic() - began < 45
    last = deployment["log"].splitlines()[-1]
    assert "host key" in last and "changed since it was first recorded" in last, last
    assert "forget_host_key" in last
    assert ssh_host.server()["ssh_known_hosts"] == recorded + "\n"
    assert not ssh_host.agent_dir.exists()


def test_an_unreachable_host_fails_quickly(
    tether: TetherServer, admin_api: Api, sshd: Sshd, tmp_path: Path
) -> None:
    host = SshHost(tether, admin_api, sshd, tmp_path, ssh_port=free_port())
    began = time.monotonic()

    deployment = host.wait_final(host.request(f"/api/servers/{host.server_id}/install/"))

    assert deployment["status"] == "failed", deployment["log"]
    assert time.monotonic() - began < 30
    assert "host unreachable" in deployment["log"].splitlines()[-1]
    assert host.server()["ssh_known_hosts"] == ""


def test_cancel_ends_the_run_and_cleans_up(ssh_host: SshHost, tether: TetherServer) -> None:
    deployment_id = ssh_host.request(f"/api/servers/{ssh_host.server_id}/install/")
    wait_for(lambda: "TASK [" in ssh_host.deployment(deployment_id)["log"], what="tasks running")

    status, body = ssh_host.api.post(f"/api/deployments/{deployment_id}/cancel/")

    assert status == 202, body
    # The worker notices within a second, stops Ansible (or the wait for the agent) and removes
    # the directory that held the key and the token.
    workdir = tether.data_dir / "deployments" / str(deployment_id)
    wait_for(lambda: not workdir.exists(), timeout=10, what="the run cleaned up")
    deployment = ssh_host.deployment(deployment_id)
    assert deployment["status"] == "cancelled"
    assert "online at version" not in deployment["log"]


def test_server_fields_reach_ansible_as_data_not_templates(
    tether: TetherServer, admin_api: Api, sshd: Sshd, tmp_path: Path
) -> None:
    """A `{{ lookup('pipe', ...) }}` in a server's fields would run on the Tether server if
    Ansible rendered it; the API refuses it, and one in the database arrives as plain text."""
    # ssh_user holds 64 characters: a short marker path.
    markers = [tmp_path / "rendered-agent-dir", Path(f"/tmp/tether-{uuid.uuid4().hex[:8]}")]
    fields = [
        {"agent_dir": f"{tmp_path}/{{{{ lookup('pipe', 'touch {markers[0]}') }}}}"},
        {"ssh_user": f"{{{{ lookup('pipe', 'touch {markers[1]}') }}}}"},
    ]
    for n, patch in enumerate(fields):
        host = SshHost(tether, admin_api, sshd, tmp_path / str(n))
        status, body = admin_api.request("PATCH", f"/api/servers/{host.server_id}/", patch)
        assert status == 400, body  # the API refuses such values up front...
        # ...and a row that holds one anyway (written before that check existed, or by hand)
        # still reaches Ansible as plain text.
        ((column, value),) = patch.items()
        tether.sql(f"UPDATE fleet_server SET {column} = ? WHERE id = ?", value, host.server_id)
        try:
            deployment = host.wait_final(host.request(f"/api/servers/{host.server_id}/install/"))
        finally:
            host.stop_everything()
            # Were the template rendered, an agent would now run in the rendered directory.
            host.agent_dir = tmp_path
            host.stop_everything()

        assert deployment["status"] == "failed", deployment["log"]
    rendered = [m for m in markers if m.exists()]
    for marker in rendered:
        marker.unlink()
    assert not rendered
