"""Signed agent requests (docs/agent-protocol.md): HMAC over method, path, time and body."""

import json
import time

from asgiref.sync import sync_to_async
from django.test import AsyncClient, override_settings
from rest_framework.test import APIClient

from tether.fleet import credentials, services
from tether.fleet.authentication import REFUSAL

from ..base import BaseTestCase

HEARTBEAT = "/api/agents/heartbeat/"


class SignedAgentTestCase(BaseTestCase):
    """Alice's second agent, which registered as signing."""

    def setUp(self) -> None:
        super().setUp()
        registration = services.register_agent(
            server=self.server, hostname="signed-1", signing=True
        )
        self.signed = registration.agent
        self.token = registration.token
        self.secret = registration.secret_key

    def headers(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        timestamp: int | None = None,
        secret: str | None = None,
        nonce: str = "",
    ) -> dict[str, str]:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        signature = credentials.sign(secret or self.secret, method, path, ts, body, nonce)
        headers = {
            "X-Agent-Token": self.token,
            "X-Tether-Timestamp": ts,
            "X-Tether-Signature": signature,
        }
        if nonce:
            headers["X-Tether-Nonce"] = nonce
        return headers

    def post(self, path: str, body: bytes, headers: dict[str, str]):
        return APIClient().post(path, body, content_type="application/json", headers=headers)

    def heartbeat(self, body: bytes = b"{}", **kw):
        return self.post(HEARTBEAT, body, self.headers("POST", HEARTBEAT, body, **kw))

    def assertRefused(self, response) -> None:
        error = self.assertError(response, 401, "authentication_failed")
        # Every refusal looks the same: no hint of what was wrong.
        self.assertEqual(error["message"], REFUSAL)


class SigningTestCase(SignedAgentTestCase):
    def test_it_works(self) -> None:
        response = self.heartbeat(b'{"version": "3.0.0"}')

        self.assertEqual(response.status_code, 200, response.content)
        self.signed.refresh_from_db()
        self.assertEqual(self.signed.status, "online")
        self.assertEqual(self.signed.version, "3.0.0")

    def test_a_signing_agent_is_not_legacy(self) -> None:
        body = self.client.get(f"/api/agents/{self.signed.pk}/").json()

        self.assertIs(body["legacy"], False)

    def test_it_refuses_a_missing_signature(self) -> None:
        self.assertRefused(self.post(HEARTBEAT, b"{}", {"X-Agent-Token": self.token}))

    def test_it_refuses_a_missing_timestamp(self) -> None:
        headers = self.headers("POST", HEARTBEAT, b"{}")
        del headers["X-Tether-Timestamp"]

        self.assertRefused(self.post(HEARTBEAT, b"{}", headers))

    def test_it_refuses_a_wrong_signature(self) -> None:
        headers = self.headers("POST", HEARTBEAT, b"{}")
        headers["X-Tether-Signature"] = "0" * 64

        self.assertRefused(self.post(HEARTBEAT, b"{}", headers))

    def test_it_refuses_another_agents_key(self) -> None:
        other = services.register_agent(server=self.server, hostname="signed-2", signing=True)

        self.assertRefused(self.heartbeat(secret=other.secret_key))

    def test_it_refuses_a_changed_body(self) -> None:
        headers = self.headers("POST", HEARTBEAT, b"{}")

        self.assertRefused(self.post(HEARTBEAT, b'{"version": "6.6.6"}', headers))
        self.signed.refresh_from_db()
        self.assertEqual(self.signed.version, "")

    def test_it_refuses_a_signature_for_another_path(self) -> None:
        command = self.queue(agent=self.signed)
        path = f"/api/agents/command/{command.pk}/result/"
        body = json.dumps({"success": True}).encode()

        self.assertRefused(self.post(path, body, self.headers("POST", HEARTBEAT, body)))
        command.refresh_from_db()
        self.assertEqual(command.status, "queued")

    def test_it_signs_the_query_string(self) -> None:
        path = HEARTBEAT + "?x=1"

        signed_without = self.headers("POST", HEARTBEAT, b"{}")
        self.assertRefused(self.post(path, b"{}", signed_without))
        signed_with = self.headers("POST", path, b"{}")
        self.assertEqual(self.post(path, b"{}", signed_with).status_code, 200)

    def test_it_refuses_a_stale_timestamp(self) -> None:
        self.assertRefused(self.heartbeat(timestamp=int(time.time()) - 301))

    def test_it_refuses_a_timestamp_from_the_future(self) -> None:
        self.assertRefused(self.heartbeat(timestamp=int(time.time()) + 301))

    def test_it_refuses_a_timestamp_a_minute_ahead(self) -> None:
        # The window refuses the future too: only clock skew lives there (30 s by default).
        self.assertRefused(self.heartbeat(timestamp=int(time.time()) + 60))
        self.assertEqual(self.heartbeat(timestamp=int(time.time()) + 20).status_code, 200)

    def test_it_refuses_a_timestamp_that_is_not_a_number(self) -> None:
        headers = self.headers("POST", HEARTBEAT, b"{}")
        headers["X-Tether-Timestamp"] = "yesterday"

        self.assertRefused(self.post(HEARTBEAT, b"{}", headers))

    def test_it_accepts_a_timestamp_inside_the_window(self) -> None:
        self.assertEqual(self.heartbeat(timestamp=int(time.time()) - 200).status_code, 200)

    @override_settings(SIGNATURE_WINDOW=10)
    def test_the_window_is_a_setting(self) -> None:
        self.assertRefused(self.heartbeat(timestamp=int(time.time()) - 60))

    def test_it_refuses_when_the_secret_cannot_be_decrypted(self) -> None:
        with override_settings(SECRET_KEY="another-" + "k" * 50):
            self.assertRefused(self.heartbeat())

    def test_it_refuses_a_signed_request_with_a_revoked_token(self) -> None:
        old_headers = self.headers("POST", HEARTBEAT, b"{}")
        services.register_agent(server=self.server, hostname="signed-1", signing=True)

        self.assertRefused(self.post(HEARTBEAT, b"{}", old_headers))

    @override_settings(ACCEPT_LEGACY_AGENTS=False)
    def test_it_refuses_legacy_agents_when_they_are_turned_off(self) -> None:
        self.assertRefused(self.agent_client.post(HEARTBEAT, {}, format="json"))
        command = self.running()  # through the services: the agent view must refuse it
        self.assertRefused(self.result(command.pk, success=True))
        command.refresh_from_db()
        self.assertEqual(command.status, "running")

    @override_settings(ACCEPT_LEGACY_AGENTS=False)
    def test_it_still_serves_signing_agents_when_legacy_is_off(self) -> None:
        self.assertEqual(self.heartbeat().status_code, 200)

    def test_it_serves_legacy_agents_by_default(self) -> None:
        self.assertEqual(self.agent_client.post(HEARTBEAT, {}, format="json").status_code, 200)


class SignedPollTestCase(SignedAgentTestCase):
    """The long-poll is an async view with its own entry: the same check applies."""

    async def poll(self, headers: dict[str, str], path: str = "/api/agents/poll_commands/?wait=0"):
        return await AsyncClient().get(path, headers=headers)

    async def aqueue(self):
        return await sync_to_async(self.queue)(agent=self.signed)

    async def test_a_signed_poll_gets_its_commands(self) -> None:
        path = "/api/agents/poll_commands/?wait=0"
        command = await self.aqueue()

        response = await self.poll(self.headers("GET", path))

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual([c["id"] for c in response.json()["commands"]], [command.pk])

    async def test_an_unsigned_poll_is_refused(self) -> None:
        command = await self.aqueue()

        response = await self.poll({"X-Agent-Token": self.token})

        self.assertRefused(response)
        await command.arefresh_from_db()
        self.assertEqual(command.status, "queued")

    async def test_a_poll_signed_for_another_wait_is_refused(self) -> None:
        headers = self.headers("GET", "/api/agents/poll_commands/?wait=0")

        self.assertRefused(await self.poll(headers, "/api/agents/poll_commands/?wait=1"))
