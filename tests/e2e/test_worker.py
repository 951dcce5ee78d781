"""`tether worker`: background work (SSH deployments) run by a process of its own, for a
server started with no in-process workers."""

import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ADMIN_PASSWORD, BIN, TetherServer, free_port, spawn, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def server_without_workers(tmp_path: Path) -> TetherServer:
    server = TetherServer(tmp_path / "data", extra_env={"TETHER_WORKER_THREADS": "0"})
    server.data_dir.mkdir()
    server.setup().start()
    yield server
    server.kill(signal.SIGTERM)


def test_a_separate_worker_runs_the_deployments_the_server_queues(
    server_without_workers: TetherServer, tmp_path: Path
) -> None:
    server = server_without_workers
    api = server.login("admin", ADMIN_PASSWORD)
    key = tmp_path / "key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    status, body = api.post(
        "/api/servers/",
        {
            "name": "nowhere",
            "host": "127.0.0.1",
            "ssh_port": free_port(),  # nothing listens: the run fails at once, wherever it runs
            "ssh_private_key": key.read_text(),
        },
    )
    assert status == 201, body
    status, body = api.post(f"/api/servers/{body['id']}/install/")
    assert status == 202, body
    deployment_id = body["deployment_id"]
    # Nobody runs it yet: the server has no worker of its own.
    assert server.sql("SELECT count(*) FROM django_tasks_database_dbtaskresult")[0][0] == 1
    assert api.get(f"/api/deployments/{deployment_id}/")[1]["status"] == "queued"

    worker = spawn([str(BIN / "tether"), "worker"], env=server.env, log=tmp_path / "worker.log")
    try:

        def final() -> dict | None:
            deployment = api.get(f"/api/deployments/{deployment_id}/")[1]
            return deployment if deployment["status"] not in ("queued", "running") else None

        deployment = wait_for(final, timeout=60, what="the worker's run")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=15)
    assert deployment["status"] == "failed", deployment["log"]
    assert "host unreachable" in deployment["log"], deployment["log"]
