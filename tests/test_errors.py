"""Every refusal is JSON: {"error": {"code", "message"}} with the right status (DESIGN §7)."""

import json

from django.conf import settings
from django.test import AsyncClient
from rest_framework.test import APIClient

from tether.commands.models import Command
from tether.errors import server_error
from tether.fleet.models import Server

from .base import BaseTestCase


class ErrorsTestCase(BaseTestCase):
    def test_an_unknown_api_path_is_a_json_404(self) -> None:
        for path in ("/api/nope/", "/api/agents/1/nope/", "/api/servers/abc/", "/nope"):
            with self.subTest(path=path):
                response = self.client.get(path)
                self.assertEqual(response["Content-Type"], "application/json")
                self.assertError(response, 404, "not_found")

    def test_an_unknown_object_is_a_json_404(self) -> None:
        self.assertError(self.client.get("/api/commands/999999/"), 404, "not_found")

    def test_an_unknown_agent_file_is_a_json_404(self) -> None:
        for name in ("settings.py", "..%2Fsettings.py", "secret_key"):
            with self.subTest(name=name):
                self.assertError(APIClient().get(f"/api/agents/files/{name}/"), 404, "not_found")

    def test_a_body_that_is_not_json_is_a_json_400(self) -> None:
        response = self.client.post("/api/servers/", "{not json", content_type="application/json")

        self.assertError(response, 400, "parse_error")
        self.assertEqual(Server.objects.filter(owner=self.alice).count(), 1)

    def test_a_non_json_body_to_an_agent_endpoint_is_a_json_400(self) -> None:
        command = self.running()

        response = self.agent_client.post(
            f"/api/agents/command/{command.pk}/result/",
            b"\xff\xfe",
            content_type="application/json",
        )

        self.assertError(response, 400, "parse_error")
        command.refresh_from_db()
        self.assertEqual(command.status, "running")

    def test_a_non_json_body_to_register_is_a_json_400(self) -> None:
        response = APIClient().post("/api/agents/register/", "[", content_type="application/json")

        self.assertError(response, 400, "parse_error")

    def test_a_form_body_is_refused(self) -> None:
        response = self.client.post("/api/servers/", {"name": "x", "host": "h"}, format="multipart")

        self.assertError(response, 415, "unsupported_media_type")
        self.assertFalse(Server.objects.filter(name="x").exists())

    def test_a_json_body_that_is_not_an_object_is_a_400(self) -> None:
        self.assertError(self.post_json("/api/servers/", ["alice-db"]), 400, "invalid")

    def test_an_anonymous_request_is_a_json_401(self) -> None:
        self.assertError(APIClient().get("/api/agents/"), 401, "not_authenticated")

    def test_a_bad_api_token_is_a_json_401(self) -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION="Token " + "0" * 40)

        self.assertError(client.get("/api/agents/"), 401, "authentication_failed")

    def test_a_bad_agent_token_is_a_json_401(self) -> None:
        for token in ("", "not-a-uuid", "00000000-0000-0000-0000-000000000000"):
            with self.subTest(token=token):
                client = APIClient()
                client.credentials(HTTP_X_AGENT_TOKEN=token)
                response = client.post("/api/agents/heartbeat/", {}, format="json")
                self.assertError(response, 401, "authentication_failed")

    def test_a_wrong_method_is_a_json_405(self) -> None:
        self.assertError(self.client.put("/api/agents/", {}, format="json"), 405)
        self.assertError(self.agent_client.get("/api/agents/heartbeat/"), 405)

    def test_a_body_over_the_limit_is_a_json_413(self) -> None:
        command = self.running()
        body = json.dumps({"stdout": "x" * settings.MAX_REQUEST_BYTES, "offset_stdout": 0})

        response = self.agent_client.post(
            f"/api/agents/command/{command.pk}/progress/", body, content_type="application/json"
        )

        error = self.assertError(response, 413, "too_large")
        self.assertEqual(error["limit"], settings.MAX_REQUEST_BYTES)
        self.assertFalse(command.chunks.exists())

    def test_a_validation_error_names_its_fields(self) -> None:
        error = self.assertError(self.post_json("/api/servers/", {"name": "x"}), 400, "invalid")

        self.assertIn("host", error["fields"])
        self.assertIn("host", error["message"])

    def test_a_server_error_shows_nothing_of_its_cause(self) -> None:
        response = server_error(None)

        self.assertEqual(response.status_code, 500)
        self.assertEqual(
            json.loads(response.content),
            {"error": {"code": "server_error", "message": "Internal server error."}},
        )


class PollErrorsTestCase(BaseTestCase):
    """The async long-poll answers its own errors, in the same shape."""

    async def poll(self, query: str = "?wait=0", token: str | None = None, method: str = "get"):
        headers = {"X-Agent-Token": self.agent_token if token is None else token}
        client = AsyncClient()
        return await getattr(client, method)(f"/api/agents/poll_commands/{query}", headers=headers)

    async def test_it_refuses_a_bad_token(self) -> None:
        self.assertError(await self.poll(token="nope"), 401, "authentication_failed")

    async def test_it_refuses_a_bad_wait(self) -> None:
        for query in ("?wait=abc", "?wait=-1", "?wait=nan", "?rpc_port=70000"):
            with self.subTest(query=query):
                self.assertError(await self.poll(query), 400, "invalid")

    async def test_it_refuses_a_wrong_method(self) -> None:
        self.assertError(await self.poll(method="put"), 405, "method_not_allowed")

    async def test_a_refused_poll_claims_nothing(self) -> None:
        command = await Command.objects.acreate(agent=self.agent, command="x", timeout=5)

        await self.poll("?wait=abc")

        await command.arefresh_from_db()
        self.assertEqual(command.status, "queued")


class NestedJsonTestCase(BaseTestCase):
    """A body nested deeper than the decoder can go is a 400 on every JSON endpoint, with or
    without a login; never a RecursionError and a 500."""

    def test_it_is_refused_everywhere(self) -> None:
        body = "[" * 100_000 + "]" * 100_000
        anonymous = APIClient()
        for client, url in (
            (anonymous, "/api/auth/token/"),
            (anonymous, "/api/agents/register/"),
            (self.client, "/api/runs/"),
            (self.client, "/api/servers/"),
            (self.client, "/api/rollouts/"),
            (self.client, "/api/agents/check_status/"),
            (self.client, f"/api/agents/{self.agent.pk}/send_command/"),
        ):
            with self.subTest(url=url):
                response = client.post(url, body, content_type="application/json")
                self.assertError(response, 400)

    def test_nesting_is_bounded_well_below_what_the_decoder_allows(self) -> None:
        deep = {"command": "true", "args": ["x"], "extra": json.loads("[" * 33 + "]" * 33)}
        response = self.post_json(f"/api/agents/{self.agent.pk}/send_command/", deep)
        self.assertError(response, 400)
        self.assertIn("nested deeper than 32", response.json()["error"]["message"])
        self.assertFalse(Command.objects.filter(agent=self.agent).exists())
