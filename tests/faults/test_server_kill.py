"""Server SIGKILL while an agent streams output: restarted on the same data dir and port, it
gets the rest from the agent's spool; every byte is stored once and the command ran once."""

import signal
from pathlib import Path

import pytest

from tests.conftest import ADMIN_PASSWORD, Fleet, TetherServer, wait_for
from tests.faults.conftest import (
    FAULT_ENV,
    assert_output,
    fault_survived,
    numbered,
    runs,
    start_agent,
    stored_output,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

LINES = 3000


def test_server_sigkill_mid_stream_loses_and_doubles_nothing(tmp_path: Path) -> None:
    server = TetherServer(tmp_path / "data", FAULT_ENV).setup().start()
    try:
        fleet = Fleet(server, server.login("admin", ADMIN_PASSWORD), tmp_path)
        start_agent(fleet)
        marker = tmp_path / "runs.txt"
        # Numbered lines for a few seconds: the kill lands while output still streams.
        command = fleet.send(
            f"echo run >> {marker}; for i in $(seq 1 {LINES}); do echo line-$i; "
            "[ $((i % 100)) = 0 ] && sleep 0.1; done; true"
        )
        wait_for(
            lambda: stored_output(server, command["id"]).count(b"\n") >= 200,
            what="part of the output stored",
        )
        server.kill(signal.SIGKILL)
        server.start()  # same data dir, same port

        done = fleet.wait_final(command["id"], timeout=40)

        assert done["status"] == "succeeded", done
        assert_output(server, command["id"], numbered("line", 1, LINES))
        assert done["stdout"] == numbered("line", 1, LINES).decode()
        assert runs(marker) == 1
        fault_survived()
    finally:
        server.kill()
