"""POST /api/agents/register/: a server token buys agent credentials."""

import re
from unittest import mock

from django.conf import settings
from django.core.cache import cache
from django.test import override_settings
from rest_framework.test import APIClient
from rest_framework.throttling import ScopedRateThrottle

from tether.fleet import credentials
from tether.fleet.models import Agent

from ..base import BaseTestCase


class RegisterTestCase(BaseTestCase):
    def register(self, client: APIClient | None = None, **fields):
        body = {
            "server_token": self.server_token,
            "hostname": "web-2",
            "version": "2.0.0",
            **fields,
        }
        return self.post_json("/api/agents/register/", body, client or APIClient())

    def heartbeat(self, token: str):
        client = APIClient()
        client.credentials(HTTP_X_AGENT_TOKEN=token)
        return client.post("/api/agents/heartbeat/", {}, format="json")

    def test_it_works(self) -> None:
        response = self.register(os="linux", arch="aarch64", rpc_port=8765)

        self.assertEqual(response.status_code, 201, response.content)
        body = response.json()
        agent = Agent.objects.get(pk=body["agent_id"])
        self.assertEqual(agent.server, self.server)
        self.assertEqual(agent.hostname, "web-2")
        self.assertEqual(agent.version, "2.0.0")
        self.assertEqual((agent.os, agent.arch, agent.rpc_port), ("linux", "aarch64", 8765))
        self.assertEqual(agent.status, "pending")
        self.assertFalse(agent.signs_requests)
        self.assertEqual(body["server_id"], self.server.pk)
        self.assertEqual(body["rpc_port"], 8765)
        self.assertEqual(body["heartbeat_mode"], "push")
        self.assertRegex(body["secret_key"], r"^[0-9a-f]{64}$")
        self.assertIsNotNone(credentials.canonical_agent_token(body["token"]))
        config = body["config"]
        for key in ("heartbeat_interval", "poll_interval", "long_poll_timeout"):
            self.assertGreater(config[key], 0)
        self.assertEqual(config["max_output_bytes"], 2 * settings.MAX_OUTPUT_BYTES)

    def test_it_stores_credentials_hashed_and_encrypted(self) -> None:
        body = self.register().json()

        agent = Agent.objects.get(pk=body["agent_id"])
        self.assertNotIn(body["token"].replace("-", ""), agent.token_hash)
        self.assertNotIn(body["secret_key"], agent.secret_key_encrypted)
        self.assertEqual(credentials.decrypt(agent.secret_key_encrypted), body["secret_key"])

    def test_the_new_token_authenticates(self) -> None:
        body = self.register().json()

        self.assertEqual(self.heartbeat(body["token"]).status_code, 200)

    def test_it_accepts_the_token_with_or_without_hyphens(self) -> None:
        token = self.register().json()["token"]
        self.assertTrue(re.fullmatch(r"[0-9a-f-]{36}", token))

        for variant in (token, token.replace("-", ""), token.upper(), f" {token} "):
            with self.subTest(token=variant):
                self.assertEqual(self.heartbeat(variant).status_code, 200)

    def test_it_records_signing(self) -> None:
        body = self.register(signing="hmac-sha256").json()

        self.assertTrue(Agent.objects.get(pk=body["agent_id"]).signs_requests)

    def test_registering_again_rotates_the_credentials(self) -> None:
        first = self.register().json()
        Agent.objects.filter(pk=first["agent_id"]).update(status="online")

        second = self.register(version="2.1.0").json()

        self.assertEqual(second["agent_id"], first["agent_id"])
        self.assertNotEqual(second["token"], first["token"])
        self.assertNotEqual(second["secret_key"], first["secret_key"])
        self.assertEqual(Agent.objects.filter(server=self.server, hostname="web-2").count(), 1)
        self.assertEqual(Agent.objects.get(pk=first["agent_id"]).version, "2.1.0")
        self.assertEqual(self.heartbeat(second["token"]).status_code, 200)

    def test_the_old_token_is_refused_after_registering_again(self) -> None:
        first = self.register().json()
        self.register()

        self.assertError(self.heartbeat(first["token"]), 401, "authentication_failed")

    def test_it_refuses_an_unknown_server_token(self) -> None:
        self.assertError(self.register(server_token="nope"), 401, "authentication_failed")
        self.assertFalse(Agent.objects.filter(hostname="web-2").exists())

    def test_it_refuses_another_servers_hash_as_token(self) -> None:
        error = self.assertError(self.register(server_token=self.server.token_hash), 401)
        self.assertNotIn(self.server.token_hash, error["message"])

    def test_it_refuses_missing_fields(self) -> None:
        for missing in ("server_token", "hostname"):
            with self.subTest(missing=missing):
                body = {"server_token": self.server_token, "hostname": "web-2"}
                del body[missing]
                response = self.post_json("/api/agents/register/", body, APIClient())
                self.assertError(response, 400, "invalid")
        self.assertFalse(Agent.objects.filter(hostname="web-2").exists())

    def test_it_refuses_bad_fields(self) -> None:
        for fields in ({"rpc_port": 70000}, {"signing": "md5"}, {"hostname": "x" * 256}):
            with self.subTest(fields=fields):
                self.assertError(self.register(**fields), 400, "invalid")
        self.assertEqual(Agent.objects.filter(server=self.server).count(), 1)

    def test_it_needs_no_user(self) -> None:
        # Registration is anonymous; a logged-in human gets no special treatment either.
        self.assertEqual(self.register(client=self.client).status_code, 201)


class RegisterThrottleTestCase(BaseTestCase):
    def register(self, address: str = "192.0.2.1", token: str | None = None):
        return APIClient(REMOTE_ADDR=address).post(
            "/api/agents/register/",
            {"server_token": token or "wrong", "hostname": "web-2"},
            format="json",
        )

    def setUp(self) -> None:
        super().setUp()
        rates = {"register": "3/min"}
        # DRF reads its rates when the throttle class is defined: patch them too.
        patcher = mock.patch.object(ScopedRateThrottle, "THROTTLE_RATES", rates)
        patcher.start()
        self.addCleanup(patcher.stop)
        overrides = override_settings(
            REST_FRAMEWORK={**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
        )
        overrides.enable()
        self.addCleanup(overrides.disable)
        cache.clear()
        self.addCleanup(cache.clear)

    def test_it_throttles_registration_per_address(self) -> None:
        for _ in range(3):
            self.assertEqual(self.register().status_code, 401)

        response = self.register()

        self.assertError(response, 429, "throttled")
        self.assertIn("Retry-After", response.headers)

    def test_it_throttles_even_with_a_good_token(self) -> None:
        for _ in range(3):
            self.register(token=self.server_token)

        self.assertError(self.register(token=self.server_token), 429)

    def test_another_address_is_not_throttled(self) -> None:
        for _ in range(4):
            self.register("192.0.2.1")

        self.assertEqual(self.register("192.0.2.2").status_code, 401)

    def test_a_forged_forwarded_for_header_does_not_escape_the_throttle(self) -> None:
        client = APIClient(REMOTE_ADDR="192.0.2.1")
        statuses = [
            client.post(
                "/api/agents/register/",
                {"server_token": "wrong", "hostname": "web-2"},
                format="json",
                HTTP_X_FORWARDED_FOR=f"203.0.113.{i}",
            ).status_code
            for i in range(4)
        ]

        self.assertEqual(statuses, [401, 401, 401, 429])

    def test_behind_a_proxy_it_keys_on_the_address_the_proxy_saw(self) -> None:
        # TETHER_NUM_PROXIES=1: the proxy appends the client's address; what the client put
        # before it is not trusted, so a new forged entry each time does not escape.
        rest = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
        proxy = APIClient(REMOTE_ADDR="10.0.0.254")
        with override_settings(REST_FRAMEWORK=rest):
            statuses = [
                proxy.post(
                    "/api/agents/register/",
                    {"server_token": "wrong", "hostname": "web-2"},
                    format="json",
                    HTTP_X_FORWARDED_FOR=f"203.0.113.{i}, {client}",
                ).status_code
                for i, client in enumerate(["198.51.100.7"] * 4 + ["198.51.100.8"])
            ]

        self.assertEqual(statuses, [401, 401, 401, 429, 401])
