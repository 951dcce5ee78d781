"""A command writes far more than the agent spools while the agent cannot reach the server:
the agent keeps its head and a rolling tail on bounded disk, then declares the bytes it
dropped, so the stored output still ends with the command's last line (its error) and the
count of dropped bytes is exact (docs/agent-protocol.md, Output limits)."""

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_PASSWORD, Fleet, TetherServer, wait_for
from tests.faults.conftest import (
    LEDGER,
    FaultProxy,
    fault_survived,
    start_agent,
    stored_output,
    stored_runs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

CAP = 64 * 1024  # TETHER_MAX_OUTPUT_BYTES: the server keeps 32 KiB of head, 32 KiB of tail
SEGMENT = 16 * 1024  # the agent's smallest spool file (MIN_SEGMENT_BYTES)
FILLER = 2_000_000  # thirty times what the agent spools of a stream
FIRST, LAST = b"first line\n", b"\nerror: the last line\n"
TOTAL = len(FIRST) + FILLER + len(LAST)


@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data = tmp_path_factory.mktemp("spool-cap")
    server = TetherServer(data, extra_env={"TETHER_MAX_OUTPUT_BYTES": str(CAP)}).setup().start()
    fleet = Fleet(server, server.login("admin", ADMIN_PASSWORD), tmp_path_factory.mktemp("op"))
    yield fleet
    if fleet.agent_proc and fleet.agent_proc.proc and fleet.agent_proc.proc.poll() is None:
        fleet.agent_proc.kill()
    server.kill(signal.SIGTERM)


def spooled(state_dir: Path) -> int:
    return sum(f.stat().st_size for f in (state_dir / "out").iterdir())


def test_output_past_the_spool_keeps_its_last_line_and_an_exact_count(
    fleet: Fleet, tmp_path: Path
) -> None:
    proxy = FaultProxy(fleet.server.port)
    try:
        agent = start_agent(fleet, url=proxy.url)
        gate, done = tmp_path / "gate", tmp_path / "done"
        command = fleet.send(
            f"printf 'first line\\n'; while [ ! -e {gate} ]; do sleep 0.02; done; "
            f"head -c {FILLER} /dev/zero | tr '\\0' x; printf '\\nerror: the last line\\n'; "
            f"touch {done}; exit 3"
        )
        wait_for(lambda: stored_output(fleet.server, command["id"]) == FIRST, what="the head")

        proxy.set_mode("cut")  # nothing reaches the server while the command writes
        gate.touch()
        journal = agent.state_dir / "commands" / f"{command['id']}.json"
        wait_for(
            lambda: done.exists() and '"state":"done"' in journal.read_text(),
            what="the command ended on the agent",
        )
        # Both streams of one command on disk: at most twice (head + tail + one segment).
        assert spooled(agent.state_dir) <= 2 * (CAP + SEGMENT)
        proxy.set_mode("open")
        final = fleet.wait_final(command["id"])
    finally:
        proxy.close()

    assert final["status"] == "failed" and final["exit_code"] == 3, final
    (start, head), (resumed, tail) = stored_runs(fleet.server, command["id"])
    assert start == 0 and head == FIRST + b"x" * (CAP // 2 - len(FIRST))
    assert tail == b"x" * (CAP // 2 - len(LAST)) + LAST and resumed + len(tail) == TOTAL
    assert final["stdout_dropped"] == TOTAL - CAP and final["truncated"] is True
    marker = f"\n[... {TOTAL - CAP:,} bytes dropped ...]\n"  # the documented form
    assert final["stdout"] == (head + marker.encode() + tail).decode()
    LEDGER["bytes_compared"] += len(head) + len(tail)
    fault_survived()
