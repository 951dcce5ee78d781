"""Bad input, in one table: each case gets a clear 4xx JSON error and changes nothing."""

import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import Api, Fleet, TetherServer


class SignedAgent:
    """A scripted agent speaking Tether's dialect (signed requests) from the test."""

    def __init__(self, server: TetherServer, server_token: str) -> None:
        status, body = Api(server.url).post(
            "/api/agents/register/",
            {
                "server_token": server_token,
                "hostname": f"scripted-{uuid.uuid4().hex[:6]}",
                "version": "9.9.9",
                "signing": "hmac-sha256",
            },
        )
        assert status == 201, body
        self.url, self.id, self.token, self.secret = (
            server.url,
            body["agent_id"],
            body["token"],
            body["secret_key"],
        )

    def headers(
        self,
        method: str,
        path: str,
        body: bytes,
        *,
        secret: str | None = None,
        timestamp: int | None = None,
    ) -> dict[str, str]:
        ts = str(timestamp if timestamp is not None else int(time.time()))
        message = "\n".join([method, path, ts, hashlib.sha256(body).hexdigest()]).encode()
        key = (secret or self.secret).encode()
        return {
            "X-Agent-Token": self.token,
            "X-Tether-Timestamp": ts,
            "X-Tether-Signature": hmac.new(key, message, hashlib.sha256).hexdigest(),
        }

    def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None, **sign: Any
    ) -> tuple[int, Any]:
        payload = (
            raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        )
        return Api(self.url).request(
            method,
            path,
            raw=payload if method != "GET" else None,
            headers=self.headers(method, path, payload, **sign),
        )


@dataclass
class World:
    server: TetherServer
    alice: Api
    bob: Api
    agent: SignedAgent
    other_agent: SignedAgent
    command_id: int
    other_command_id: int
    bob_agent_id: int


@pytest.fixture(scope="module")
def world(tether: TetherServer, admin_api: Api, tmp_path_factory) -> World:
    alice = tether.create_user(f"alice{uuid.uuid4().hex[:4]}", "alice-pw-123456")
    bob = tether.create_user(f"bob{uuid.uuid4().hex[:4]}", "bob-pw-123456")
    alice_fleet = Fleet(tether, alice, tmp_path_factory.mktemp("alice"))
    agent = SignedAgent(tether, alice_fleet.server_token)
    other_agent = SignedAgent(tether, alice_fleet.server_token)
    bob_fleet = Fleet(tether, bob, tmp_path_factory.mktemp("bob"))
    bob_agent = SignedAgent(tether, bob_fleet.server_token)

    def queue(agent_id: int) -> int:
        status, body = alice.post(f"/api/agents/{agent_id}/send_command/", {"command": "x"})
        assert status == 201, body
        return body["id"]

    command_id, other_command_id = queue(agent.id), queue(other_agent.id)
    # The scripted agent takes its command and streams 6 bytes of it.
    status, body = agent.call("GET", "/api/agents/poll_commands/")
    assert status == 200 and [c["id"] for c in body["commands"]] == [command_id], body
    status, body = agent.call(
        "POST",
        f"/api/agents/command/{command_id}/progress/",
        {"stdout": "hello\n", "offset_stdout": 0, "append": True},
    )
    assert status == 200, body
    return World(tether, alice, bob, agent, other_agent, command_id, other_command_id, bob_agent.id)


def progress(w: World, body: Any = None, **kw: Any) -> tuple[int, Any]:
    return w.agent.call("POST", f"/api/agents/command/{w.command_id}/progress/", body, **kw)


def anon(w: World, method: str, path: str, headers: dict | None = None) -> tuple[int, Any]:
    return Api(w.server.url).request(method, path, headers=headers)


CASES: dict[str, tuple[int, Callable[[World], tuple[int, Any]]]] = {
    "missing agent token": (401, lambda w: anon(w, "GET", "/api/agents/poll_commands/")),
    "unknown agent token": (
        401,
        lambda w: anon(
            w, "GET", "/api/agents/poll_commands/", {"X-Agent-Token": str(uuid.uuid4())}
        ),
    ),
    "malformed agent token": (
        401,
        lambda w: anon(w, "GET", "/api/agents/poll_commands/", {"X-Agent-Token": "not-a-uuid'--"}),
    ),
    "token of a signing agent without signature": (
        401,
        lambda w: anon(w, "GET", "/api/agents/poll_commands/", {"X-Agent-Token": w.agent.token}),
    ),
    "wrong signature": (
        401,
        lambda w: w.agent.call("GET", "/api/agents/poll_commands/", secret="0" * 64),
    ),
    "stale timestamp": (
        401,
        lambda w: w.agent.call(
            "GET", "/api/agents/poll_commands/", timestamp=int(time.time()) - 3600
        ),
    ),
    "chunk past the stored end": (
        409,
        lambda w: progress(w, {"stdout": "gap", "offset_stdout": 100, "append": True}),
    ),
    "chunk gap on one stream refuses the other too": (
        409,
        lambda w: progress(
            w, {"stdout": "more\n", "offset_stdout": 6, "stderr": "x", "offset_stderr": 5}
        ),
    ),
    "negative offset": (400, lambda w: progress(w, {"stdout": "x", "offset_stdout": -1})),
    "bad base64": (
        400,
        lambda w: progress(w, {"stdout": "!!!", "offset_stdout": 6, "encoding": "base64"}),
    ),
    "unknown encoding": (
        400,
        lambda w: progress(w, {"stdout": "x", "offset_stdout": 6, "encoding": "rot13"}),
    ),
    "oversized body": (
        413,
        lambda w: progress(w, {"stdout": "x" * (2 * 1024 * 1024), "offset_stdout": 6}),
    ),
    "non-JSON body": (400, lambda w: progress(w, raw=b"stdout=hello")),
    "JSON that is not an object": (400, lambda w: progress(w, raw=b"[1, 2]")),
    "unknown command id": (
        404,
        lambda w: w.agent.call(
            "POST", "/api/agents/command/999999/progress/", {"stdout": "x", "offset_stdout": 0}
        ),
    ),
    "another agent's command id": (
        404,
        lambda w: w.agent.call(
            "POST", f"/api/agents/command/{w.other_command_id}/result/", {"success": True}
        ),
    ),
    "result without status or success": (
        400,
        lambda w: w.agent.call(
            "POST", f"/api/agents/command/{w.command_id}/result/", {"exit_code": 0}
        ),
    ),
    "result short of the output it claims": (
        409,
        lambda w: w.agent.call(
            "POST",
            f"/api/agents/command/{w.command_id}/result/",
            {"status": "succeeded", "success": True, "exit_code": 0, "stdout_size": 50},
        ),
    ),
    "register with an unknown server token": (
        401,
        lambda w: Api(w.server.url).post(
            "/api/agents/register/", {"server_token": "nope", "hostname": "h"}
        ),
    ),
    "files: settings.py": (404, lambda w: anon(w, "GET", "/api/agents/files/settings.py/")),
    "files: ../ in the name": (
        404,
        lambda w: anon(w, "GET", "/api/agents/files/..%2Fsettings.py/"),
    ),
    "files: encoded dots": (404, lambda w: anon(w, "GET", "/api/agents/files/%2e%2e%2fmain.py/")),
    "files: NUL suffix": (404, lambda w: anon(w, "GET", "/api/agents/files/main.py%00/")),
    "files: double-encoded": (
        404,
        lambda w: anon(w, "GET", "/api/agents/files/%252e%252e%252fmain.py/"),
    ),
    "B reads A's agent": (404, lambda w: w.bob.get(f"/api/agents/{w.agent.id}/")),
    "B commands A's agent": (
        404,
        lambda w: w.bob.post(f"/api/agents/{w.agent.id}/send_command/", {"command": "id"}),
    ),
    "B lists A's history": (404, lambda w: w.bob.get(f"/api/agents/{w.agent.id}/commands/")),
    "B reads A's command": (404, lambda w: w.bob.get(f"/api/commands/{w.command_id}/")),
    "B cancels A's command": (404, lambda w: w.bob.post(f"/api/commands/{w.command_id}/cancel/")),
    "B streams A's command": (404, lambda w: w.bob.get(f"/api/commands/{w.command_id}/stream/")),
    "A commands B's agent": (
        404,
        lambda w: w.alice.post(f"/api/agents/{w.bob_agent_id}/send_command/", {"command": "id"}),
    ),
    "anonymous lists agents": (401, lambda w: anon(w, "GET", "/api/agents/")),
    "send_command with an unknown field": (
        400,
        lambda w: w.alice.post(
            f"/api/agents/{w.agent.id}/send_command/", {"command": "id", "sudo": True}
        ),
    ),
    "send_command with a zero timeout": (
        400,
        lambda w: w.alice.post(
            f"/api/agents/{w.agent.id}/send_command/", {"command": "id", "timeout": 0}
        ),
    ),
    "send_command with a huge timeout": (
        400,
        lambda w: w.alice.post(
            f"/api/agents/{w.agent.id}/send_command/", {"command": "id", "timeout": 10**9}
        ),
    ),
    "send_command with args not strings": (
        400,
        lambda w: w.alice.post(
            f"/api/agents/{w.agent.id}/send_command/", {"command": "ls", "args": [{"a": 1}]}
        ),
    ),
    "send_command blank": (
        400,
        lambda w: w.alice.post(f"/api/agents/{w.agent.id}/send_command/", {"command": "   "}),
    ),
    "template with an undeclared parameter type": (
        400,
        lambda w: w.alice.post(
            "/api/agents/command-templates/",
            {"name": "t", "command": "echo {x}", "parameters": [{"name": "x", "type": "file"}]},
        ),
    ),
}


def fingerprint(w: World) -> list[tuple]:
    """Everything a refused call must leave untouched (this module's objects only, so that
    agents of other tests finishing their work do not count)."""
    agents = (w.agent.id, w.other_agent.id, w.bob_agent_id)
    return [
        *w.server.sql(
            "SELECT id, status, stdout_end, stderr_end, stored_bytes, exit_code "
            "FROM commands_command WHERE agent_id IN (?, ?, ?) ORDER BY id",
            *agents,
        ),
        *w.server.sql(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM commands_outputchunk "
            "WHERE command_id IN (?, ?)",
            w.command_id,
            w.other_command_id,
        ),
        *w.server.sql("SELECT COUNT(*) FROM commands_commandtemplate"),
        *w.server.sql("SELECT id, token_hash FROM fleet_agent WHERE id IN (?, ?, ?)", *agents),
    ]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_changes_nothing(world: World, case: str) -> None:
    expected_status, call = CASES[case]
    before = fingerprint(world)
    status, body = call(world)
    assert status == expected_status, body
    if status != 404 or not case.startswith("files"):
        assert isinstance(body, dict) and set(body["error"]) >= {"code", "message"}, body
    assert fingerprint(world) == before


def test_a_body_over_every_limit_is_refused_before_it_is_read(tether: TetherServer) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", tether.port, timeout=10)
    conn.putrequest("POST", "/api/agents/register/")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10**10))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "too_large"


def test_a_chunked_body_over_every_limit_is_refused(tether: TetherServer) -> None:
    import http.client

    def body():
        for _ in range(40):
            yield b"x" * (1024 * 1024)

    conn = http.client.HTTPConnection("127.0.0.1", tether.port, timeout=30)
    # The server may answer and close before the client has sent it all.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.request(
            "POST",
            "/api/agents/register/",
            body=body(),
            encode_chunked=True,
            headers={"Content-Type": "application/json"},
        )
    response = conn.getresponse()
    assert response.status == 413
    assert Api(tether.url).get("/healthz")[0] == 200
