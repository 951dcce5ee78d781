"""The server stopped (SIGSTOP) for 40 s while one agent streams a command's output and
another, started during the stop, has a command queued; then continued. Both agents come
back, the queued command is delivered once, the output is whole. (The stop begins before the
other faults and runs while they do: see the fault suite's conftest.)"""

import os
import signal
import time
from types import SimpleNamespace

import pytest

from tests.conftest import wait_for
from tests.faults.conftest import (
    STOP_LINES,
    STOP_SECONDS,
    assert_output,
    fault_survived,
    numbered,
    runs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def test_a_server_stopped_for_40_s_comes_back_with_every_byte_and_no_double_run(
    stopped_server: SimpleNamespace,
) -> None:
    stopped = stopped_server
    wait_for(
        lambda: time.monotonic() - stopped.stopped_at >= STOP_SECONDS,
        timeout=STOP_SECONDS + 5,
        interval=0.2,
        what="the end of the stop (the fault itself)",
    )
    os.killpg(stopped.server.proc.pid, signal.SIGCONT)
    fleet = stopped.fleet

    fleet.wait_online()
    wait_for(
        lambda: fleet.api.get(f"/api/agents/{stopped.second['agent']}/")[1]["status"] == "online",
        what="the agent started during the stop online",
    )
    first = fleet.wait_final(stopped.first["id"], timeout=30)
    second = fleet.wait_final(stopped.second["id"], timeout=30)
    third = fleet.run("echo third")  # and new work reaches the first agent

    assert first["status"] == "succeeded", first
    assert_output(stopped.server, first["id"], numbered("line", 1, STOP_LINES))
    assert second["status"] == "succeeded" and second["stdout"] == "second\n", second
    assert third["status"] == "succeeded" and third["stdout"] == "third\n", third
    # Handed out once or twice (polls the agent gave up on during the stop are answered after
    # it, and their lease runs out), run once.
    assert runs(stopped.markers[0]) == 1 and runs(stopped.markers[1]) == 1
    assert fleet.agent_proc.proc.poll() is None and stopped.agent_b.proc.poll() is None
    fault_survived()
