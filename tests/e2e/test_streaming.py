"""Live output: the SSE stream shows output before the command ends."""

import json
import time
import urllib.request

from tests.conftest import Fleet


def read_events(fleet: Fleet, command_id: int, until: float = 30):
    """Yield (event, data, seconds since start) from the command's SSE stream."""
    request = urllib.request.Request(
        f"{fleet.server.url}/api/commands/{command_id}/stream/", headers=fleet.api.headers
    )
    start = time.monotonic()
    with urllib.request.urlopen(request, timeout=until) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        event = None
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                yield event, json.loads(line[6:]), time.monotonic() - start


def test_it_streams_output_before_the_command_finishes(fleet: Fleet) -> None:
    command = fleet.send("for i in 1 2 3; do echo $i; sleep 1; done")
    first_output_at = None
    end = None
    for event, data, at in read_events(fleet, command["id"]):
        if event == "output" and first_output_at is None:
            assert data["data"].startswith("1")
            first_output_at = at
            assert fleet.command(command["id"])["status"] == "running"
        if event == "end":
            end = (data, at)
            break
    assert first_output_at is not None and end is not None
    assert end[0]["status"] == "succeeded" and end[0]["exit_code"] == 0
    assert end[1] - first_output_at > 1.0


def test_it_sends_all_output_then_the_final_status(fleet: Fleet) -> None:
    command = fleet.run("seq 1 5000; echo err >&2; exit 4")
    out, err, final = "", "", None
    for event, data, _ in read_events(fleet, command["id"]):
        if event == "output":
            if data["stream"] == "stdout":
                out += data["data"]
            else:
                err += data["data"]
        if event == "end":
            final = data
            break
    assert out == "".join(f"{i}\n" for i in range(1, 5001))
    assert err == "err\n"
    assert final["status"] == "failed" and final["exit_code"] == 4
