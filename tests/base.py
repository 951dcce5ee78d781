"""The shared fixture of the unit suite: Alice owns a server with a registered agent; Bob is
someone else with a server and agent of his own. Ownership is tested by asking for Bob's
objects as Alice."""

import json
from typing import Any

from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.test import TestCase
from rest_framework.test import APIClient

from tether.commands import services as command_services
from tether.commands.models import Command
from tether.fleet import services as fleet_services
from tether.fleet.models import Agent

User = get_user_model()


class BaseTestCase(TestCase):
    client_class = APIClient

    @classmethod
    def setUpTestData(cls) -> None:
        # No passwords: hashing one costs ~100 ms, and every client here is force-authenticated.
        cls.alice = User.objects.create_user("alice", email="alice@example.org")
        cls.bob = User.objects.create_user("bob", email="bob@example.org")

        cls.server, cls.server_token = fleet_services.create_server(
            owner=cls.alice, name="alice-web", host="10.0.0.1"
        )
        registration = fleet_services.register_agent(
            server=cls.server, hostname="web-1", version="1.0.0", os="linux", arch="x86_64"
        )
        cls.agent = registration.agent
        cls.agent_token = registration.token

        cls.bob_server, cls.bob_server_token = fleet_services.create_server(
            owner=cls.bob, name="bob-db", host="10.0.0.2"
        )
        cls.bob_agent = fleet_services.register_agent(server=cls.bob_server, hostname="db-1").agent

    def setUp(self) -> None:
        super().setUp()
        cache.clear()  # the registration throttle counts in the cache
        self.client.force_authenticate(self.alice)
        self.agent_client = APIClient()
        self.agent_client.credentials(HTTP_X_AGENT_TOKEN=self.agent_token)

    # Human side -------------------------------------------------------------------------

    def post_json(self, url: str, body: Any, client: APIClient | None = None) -> Any:
        return (client or self.client).post(url, body, format="json")

    def patch_json(self, url: str, body: Any, client: APIClient | None = None) -> Any:
        return (client or self.client).patch(url, body, format="json")

    def client_for(self, user: Any) -> APIClient:
        client = APIClient()
        client.force_authenticate(user)
        return client

    def assertError(self, response: Any, status: int, code: str | None = None) -> dict:
        """The response is the JSON error shape of DESIGN §7 with this status (and code)."""
        self.assertEqual(response.status_code, status, getattr(response, "content", b""))
        body = json.loads(response.content)
        self.assertEqual(set(body), {"error"})
        self.assertIsInstance(body["error"]["code"], str)
        self.assertIsInstance(body["error"]["message"], str)
        self.assertTrue(body["error"]["message"])
        if code is not None:
            self.assertEqual(body["error"]["code"], code)
        return body["error"]

    # Commands ---------------------------------------------------------------------------

    def queue(self, command: str = "echo hello", agent: Agent | None = None, **kw: Any) -> Command:
        return command_services.queue_command(
            agent=agent or self.agent, command=command, user=self.alice, **kw
        )

    def deliver(self, agent: Agent | None = None) -> list[Command]:
        """What the agent's next poll would hand out."""
        return command_services.claim_commands(agent=agent or self.agent).commands

    def delivered(self, command: str = "echo hello") -> Command:
        queued = self.queue(command)
        self.deliver()
        queued.refresh_from_db()
        return queued

    def running(self, command: str = "echo hello") -> Command:
        cmd = self.delivered(command)
        command_services.record_progress(agent=self.agent, command_id=cmd.pk, chunks=[])
        cmd.refresh_from_db()
        return cmd

    # Agent side -------------------------------------------------------------------------

    def agent_post(self, url: str, body: Any, client: APIClient | None = None) -> Any:
        return (client or self.agent_client).post(url, body, format="json")

    def progress(self, command_id: int, **body: Any) -> Any:
        return self.agent_post(f"/api/agents/command/{command_id}/progress/", body)

    def result(self, command_id: int, **body: Any) -> Any:
        return self.agent_post(f"/api/agents/command/{command_id}/result/", body)

    def read(self, command_id: int) -> dict:
        """The command as Alice reads it from the API (output decoded to text)."""
        response = self.client.get(f"/api/commands/{command_id}/")
        self.assertEqual(response.status_code, 200, response.content)
        return response.json()
