"""Output past TETHER_MAX_OUTPUT_BYTES with a real server and agent: the head, one marker line
with the count of dropped bytes, and the command's last line (its error) survive in the API,
the command's stream and tetherctl (docs/agent-protocol.md, Output limits)."""

import json
import re
import signal
from collections.abc import Iterator

import pytest

from tests.cli.conftest import Operator, unique
from tests.conftest import TetherServer
from tests.e2e.test_streaming import read_events

pytestmark = pytest.mark.e2e

CAP = 64 * 1024
FILLER = 100_000
# 11 + 100,000 + 22 bytes: past the cap, within what the agent spools (twice the cap).
SCRIPT = (
    f"printf 'first line\\n'; head -c {FILLER} /dev/zero | tr '\\0' x; "
    "printf '\\nerror: the last line\\n'; exit 3"
)
TOTAL = 11 + FILLER + 22
MARKER = f"\n[... {TOTAL - CAP:,} bytes dropped ...]\n"  # the documented form


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """A server of its own with a small output cap, and an operator with one agent."""
    data = tmp_path_factory.mktemp("small-cap")
    server = TetherServer(data, extra_env={"TETHER_MAX_OUTPUT_BYTES": str(CAP)}).setup().start()
    op = Operator(server, tmp_path_factory.mktemp("operator"))
    op.hosts(unique("build"))
    yield op
    op.close()
    server.kill(signal.SIGTERM)


def test_the_api_and_the_stream_show_head_marker_and_the_last_line(operator: Operator) -> None:
    fleet = operator.fleets[0]
    command = fleet.run(SCRIPT)

    assert command["status"] == "failed" and command["exit_code"] == 3
    head, tail = command["stdout"].split(MARKER)
    assert head.startswith("first line\nxxx") and len(head) == CAP // 2
    assert tail.endswith("xxx\nerror: the last line\n") and len(tail) == CAP // 2
    assert command["stdout_dropped"] == TOTAL - CAP and command["truncated"] is True
    # A client that joins once the command has ended reads the same text.
    streamed = ""
    for event, data, _ in read_events(fleet, command["id"]):
        if event == "output":
            streamed += data["data"]
        if event == "end":
            assert data["stdout_dropped"] == TOTAL - CAP
            break
    assert streamed == command["stdout"]


def test_tetherctl_shows_the_first_and_last_lines_and_what_was_dropped(
    operator: Operator,
) -> None:
    host = operator.fleets[0]
    hostname = operator.agent(host.agent_id)["hostname"]

    live = operator.ctl("run", str(host.agent_id), "--", SCRIPT)
    done = operator.ctl("run", "--json", str(host.agent_id), "--", SCRIPT)

    assert live.returncode == 1, live.stdout + live.stderr
    lines = [line.split(" | ", 1)[1] for line in live.stdout.splitlines() if " | " in line]
    assert lines[0] == "first line" and lines[-1] == "error: the last line", lines
    # Live, the client reads the bytes it finds stored: each stretch it missed is a marker,
    # and what it shows plus what the markers count is the whole output.
    shown = sum(line.count("x") for line in lines)
    missed = [
        int(n.replace(",", ""))
        for n in re.findall(r"^\[\.\.\. ([\d,]+) bytes dropped", "\n".join(lines), re.M)
    ]
    assert shown + sum(missed) == FILLER
    (target,) = json.loads(done.stdout)["targets"]
    assert target["hostname"] == hostname
    assert MARKER in target["stdout"] and target["stdout"].endswith("error: the last line\n")
    assert target["stdout_dropped"] == TOTAL - CAP
