"""An agent of the original system, speaking only the older dialect, works unchanged."""

import uuid

from tests.conftest import Api, Fleet, TetherServer, wait_for


class LegacyAgent:
    """What an original-system agent sends: no signatures, no offsets, `return_code`."""

    def __init__(self, server: TetherServer, server_token: str) -> None:
        status, body = Api(server.url).post(
            "/api/agents/register/",
            {
                "server_token": server_token,
                "version": "1.4.2",
                "hostname": f"legacy-{uuid.uuid4().hex[:6]}",
                "os": "linux",
            },
        )
        assert status == 201, body
        assert body["heartbeat_mode"] == "push"
        config = body["config"]
        for key in (
            "heartbeat_min_interval",
            "heartbeat_max_interval",
            "poll_min_interval",
            "poll_max_interval",
        ):
            assert config[key] > 0
        self.id = body["agent_id"]
        self.api = Api(server.url, {"X-Agent-Token": body["token"].replace("-", "")})

    def poll(self) -> list[dict]:
        status, body = self.api.get("/api/agents/poll/")
        assert status == 200, body
        return body["commands"]


def test_a_legacy_agent_gets_commands_and_its_output_is_stored_once(
    tether: TetherServer, admin_api: Api, tmp_path
) -> None:
    fleet = Fleet(tether, admin_api, tmp_path)
    legacy = LegacyAgent(tether, fleet.server_token)
    status, body = legacy.api.post(
        "/api/agents/heartbeat/", {"status": "online", "version": "1.4.2"}
    )
    assert status == 200 and body["status"] == "ok" and "config" in body
    fleet.agent_id = legacy.id
    fleet.wait_online()
    _, listed = admin_api.get(f"/api/agents/{legacy.id}/")
    assert listed["legacy"] is True

    sent = fleet.send("make-believe")
    commands = wait_for(legacy.poll, what="the command delivered on /poll/")
    assert [c["id"] for c in commands] == [sent["id"]]

    for part in ("line 1\n", "line 2\n"):
        status, body = legacy.api.post(
            f"/api/agents/commands/{sent['id']}/progress/", {"stdout": part, "append": True}
        )
        assert status == 200, body
    assert fleet.command(sent["id"])["stdout"] == "line 1\nline 2\n"

    status, body = legacy.api.post(
        f"/api/agents/commands/{sent['id']}/result/",
        {
            "success": False,
            "return_code": 2,
            "stdout": "line 1\nline 2\nline 3\n",
            "error": "boom\n",
            "append": False,
        },
    )
    assert status == 200, body
    done = fleet.command(sent["id"])
    assert done["status"] == "failed"
    assert done["exit_code"] == 2
    assert done["stdout"] == "line 1\nline 2\nline 3\n"
    assert done["stderr"] == "boom\n"

    # A resent result changes nothing.
    status, _ = legacy.api.post(
        f"/api/agents/commands/{sent['id']}/result/",
        {"success": True, "return_code": 0, "stdout": "other", "append": False},
    )
    assert status == 200
    assert fleet.command(sent["id"])["stdout"] == "line 1\nline 2\nline 3\n"


def test_the_deprecated_command_alias_answers_like_poll(
    tether: TetherServer, admin_api: Api, tmp_path
) -> None:
    fleet = Fleet(tether, admin_api, tmp_path)
    legacy = LegacyAgent(tether, fleet.server_token)
    status, body = legacy.api.post("/api/agents/command/")
    assert status == 200 and body["commands"] == []
    request_headers = legacy.api.headers
    import urllib.request

    req = urllib.request.Request(
        f"{tether.url}/api/agents/command/",
        data=b"{}",
        method="POST",
        headers={**request_headers, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as response:
        assert response.headers["Deprecation"] == "true"


def test_a_legacy_result_may_carry_more_than_a_progress_call(
    tether: TetherServer, admin_api: Api, tmp_path
) -> None:
    fleet = Fleet(tether, admin_api, tmp_path)
    legacy = LegacyAgent(tether, fleet.server_token)
    sent = fleet.send_to(legacy.id, "make-believe")
    wait_for(legacy.poll, what="the command delivered")
    whole = "x" * (3 * 1024 * 1024 // 2) + "\n"  # over the 1 MiB progress limit
    status, body = legacy.api.post(
        f"/api/agents/commands/{sent['id']}/progress/", {"stdout": whole}
    )
    assert status == 413, body
    status, body = legacy.api.post(
        f"/api/agents/commands/{sent['id']}/result/",
        {"success": True, "return_code": 0, "stdout": whole, "append": False},
    )
    assert status == 200, body
    assert fleet.command(sent["id"])["stdout"] == whole
