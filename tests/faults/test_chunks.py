"""Duplicated, overlapping and reordered output chunks, sent with the agent's own client (its
signing, nonces and encoding): the server stores every byte once, in order, and asks for
what is missing instead of storing a gap."""

import base64
import random
import uuid

import pytest

from tests.conftest import Api, TetherServer
from tests.faults.conftest import agent_module, assert_output, fault_survived, stored_output

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


@pytest.fixture
def signing_agent(fault_server: TetherServer, fault_api: Api):
    """A registered signing agent, driven by hand through agent/main.py's Client."""
    agent = agent_module()
    _, server = fault_api.post(
        "/api/servers/", {"name": f"chunks-{uuid.uuid4().hex[:8]}", "host": "127.0.0.1"}
    )
    status, reg = Api(fault_server.url).post(
        "/api/agents/register/",
        {
            "server_token": server["server_token"],
            "hostname": "chunks",
            "version": agent.__version__,
            "signing": "hmac-sha256",
            "machine_id": uuid.uuid4().hex,
            "instance_id": uuid.uuid4().hex,
        },
    )
    assert status == 201, reg
    client = agent.Client(fault_server.url)
    client.credentials = {"token": reg["token"], "secret_key": reg["secret_key"]}
    return reg["agent_id"], client


def payload(stream: str, size: int) -> bytes:
    """Multi-byte UTF-8 text, so that chunk edges fall inside characters."""
    text = "".join(f"{stream} {i} é€𝄞\n" for i in range(size))
    return text.encode()


def chunk_body(offsets: dict[str, int], data: dict[str, bytes]) -> dict:
    return {
        "stdout": base64.b64encode(data.get("stdout", b"")).decode(),
        "stderr": base64.b64encode(data.get("stderr", b"")).decode(),
        "offset_stdout": offsets.get("stdout", 0),
        "offset_stderr": offsets.get("stderr", 0),
        "encoding": "base64",
        "append": True,
    }


def test_duplicated_and_reordered_chunks_are_stored_exactly_once(
    fault_server: TetherServer, fault_api: Api, signing_agent
) -> None:
    agent_id, client = signing_agent
    status, command = fault_api.post(f"/api/agents/{agent_id}/send_command/", {"command": "x"})
    assert status == 201, command
    resp = client.request("GET", "/api/agents/poll_commands/?wait=0")
    assert resp.status == 200 and [c["id"] for c in resp.data["commands"]] == [command["id"]]
    cid = command["id"]
    path = f"/api/agents/command/{cid}/progress/"
    out, err = payload("out", 400), payload("err", 150)
    # Chunks of odd sizes, each one also sent again and as an overlapping stretch, shuffled.
    rng = random.Random(13)
    pieces = []
    for stream, data in (("stdout", out), ("stderr", err)):
        start = 0
        while start < len(data):
            size = rng.randint(1, 700)
            pieces.append((stream, start, data[start : start + size]))
            overlap = max(0, start - rng.randint(1, 50))
            pieces.append((stream, overlap, data[overlap : start + size]))
            start += size
    pieces *= 2
    rng.shuffle(pieces)

    gaps = duplicates = 0
    pending = list(pieces)
    for _ in range(20 * len(pieces)):
        if not pending:
            break
        stream, offset, data = pending.pop(0)
        resp = client.request("POST", path, chunk_body({stream: offset}, {stream: data}))
        if resp.status == 409:  # ahead of what is stored: the agent would send it again later
            assert resp.error_code() == "offset_gap", resp.data
            gaps += 1
            pending.append((stream, offset, data))
            continue
        assert resp.status == 200, resp.data
        duplicates += resp.data["offsets"][stream] > offset + len(data)  # all stored before
    assert not pending, "the server never took some chunks"
    assert gaps and duplicates, "the test should have sent both gaps and duplicates"

    # The result, twice (a lost answer); and a stale chunk after it changes nothing.
    result = {"status": "succeeded", "success": True, "exit_code": 0, "append": True}
    result.update(stdout_size=len(out), stderr_size=len(err))
    for _ in range(2):
        resp = client.request("POST", f"/api/agents/command/{cid}/result/", result)
        assert resp.status == 200, resp.data
    client.request("POST", path, chunk_body({"stdout": 0}, {"stdout": out[:300]}))

    assert_output(fault_server, cid, out, "stdout")
    assert_output(fault_server, cid, err, "stderr")
    _, read = fault_api.get(f"/api/commands/{cid}/")
    assert read["status"] == "succeeded"
    assert (read["stdout"], read["stderr"]) == (out.decode(), err.decode())
    assert stored_output(fault_server, cid, "stdout") == out
    fault_survived()
