"""Throttles (issue 13, row 5), at their real default rates: logins (API and page) per
username and per address, failed agent authentication per address, polls per agent. Each
refusal is a 429 with Retry-After, and nobody else is slowed by it."""

import json
from typing import Any
from unittest import mock

from django.contrib.auth.backends import ModelBackend
from django.test import Client, override_settings
from rest_framework.test import APIClient

from tether.accounts.models import ApiToken
from tether.accounts.throttling import SettingRateThrottle
from tether.fleet import services as fleet_services

from .base import BaseTestCase, User

PASSWORD = "carol-pw-for-tests"
FAST_HASHING = override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"])


class ThrottleTestCase(BaseTestCase):
    def assertThrottled(self, response: Any) -> int:
        """A 429 that says how long to wait, in the header and (JSON) in the body."""
        self.assertEqual(response.status_code, 429, response.content)
        wait = int(response.headers["Retry-After"])
        self.assertTrue(1 <= wait <= 60, wait)
        if response.headers["Content-Type"] == "application/json":
            error = self.assertError(response, 429, "throttled")
            self.assertEqual(error["retry_after"], wait)
        return wait


@FAST_HASHING
class ApiLoginThrottleTestCase(ThrottleTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.carol = User.objects.create_user("carol", password=PASSWORD)
        User.objects.create_user("dave", password=PASSWORD)

    def login(self, username: str = "carol", password: str = PASSWORD, address: str = "192.0.2.1"):
        return APIClient(REMOTE_ADDR=address).post(
            "/api/auth/token/", {"username": username, "password": password}, format="json"
        )

    def fail(self, times: int, username: str = "carol", address: str = "192.0.2.1") -> None:
        for _ in range(times):
            self.assertEqual(self.login(username, "wrong", address).status_code, 400)

    def test_the_attempt_after_ten_failures_is_throttled_even_with_the_right_password(self):
        self.fail(10)

        self.assertThrottled(self.login())
        self.assertFalse(ApiToken.objects.exists())

    def test_successful_logins_do_not_count(self) -> None:
        statuses = {self.login().status_code for _ in range(12)}

        self.assertEqual(statuses, {200})

    def test_another_user_from_the_same_address_still_logs_in(self) -> None:
        self.fail(10)

        self.assertEqual(self.login("dave").status_code, 200)

    def test_the_user_is_throttled_from_any_address(self) -> None:
        self.fail(10)

        self.assertThrottled(self.login(address="198.51.100.7"))

    def test_spaces_and_case_do_not_make_another_username(self) -> None:
        for username in ["carol", " carol", "CAROL", "Carol "] * 2 + ["carol", "carol"]:
            self.login(username, "wrong")

        self.assertThrottled(self.login())

    def test_an_address_guessing_many_usernames_is_throttled(self) -> None:
        for n in range(30):
            self.fail(1, username=f"user{n}")

        self.assertThrottled(self.login())
        self.assertEqual(self.login(address="192.0.2.2").status_code, 200)

    def test_a_throttled_attempt_has_its_password_checked_no_more(self) -> None:
        self.fail(10)
        with mock.patch.object(ModelBackend, "authenticate", return_value=None) as authenticate:
            self.assertThrottled(self.login())
        authenticate.assert_not_called()

    def test_it_lets_the_user_in_again_once_the_minute_has_passed(self) -> None:
        self.fail(10)
        wait = self.assertThrottled(self.login())

        later = SettingRateThrottle.timer() + wait + 0.01
        with mock.patch.object(SettingRateThrottle, "timer", lambda self: later):
            self.assertEqual(self.login().status_code, 200)


@FAST_HASHING
class PageLoginThrottleTestCase(ThrottleTestCase):
    def setUp(self) -> None:
        super().setUp()
        User.objects.create_user("carol", password=PASSWORD)

    def login(self, password: str = PASSWORD, address: str = "192.0.2.1", username: str = "carol"):
        return Client(REMOTE_ADDR=address).post(
            "/login/", {"username": username, "password": password}
        )

    def test_the_attempt_after_ten_failures_is_a_429_page(self) -> None:
        for _ in range(10):
            response = self.login("wrong")
            self.assertContains(response, "Wrong username or password.")

        response = self.login()

        self.assertThrottled(response)
        self.assertContains(response, "Too many failed logins", status_code=429)
        self.assertContains(response, 'value="carol"', status_code=429)
        self.assertNotIn("_auth_user_id", response.wsgi_request.session)

    def test_failures_on_the_api_and_the_page_count_together(self) -> None:
        for _ in range(5):
            APIClient(REMOTE_ADDR="192.0.2.1").post(
                "/api/auth/token/", {"username": "carol", "password": "wrong"}, format="json"
            )
            self.login("wrong")

        self.assertThrottled(self.login())

    def test_another_address_and_user_still_log_in(self) -> None:
        User.objects.create_user("dave", password=PASSWORD)
        for n in range(30):
            self.login("wrong", username=f"user{n}")
        self.assertThrottled(self.login())

        self.assertRedirects(self.login(address="192.0.2.2"), "/", fetch_redirect_response=False)


class AgentAuthFailureThrottleTestCase(ThrottleTestCase):
    """60 refused agent requests a minute per address (TETHER_AGENT_AUTH_FAIL_RATE)."""

    def intruder(self, token: str = "00000000-0000-0000-0000-000000000000") -> APIClient:
        client = APIClient(REMOTE_ADDR="203.0.113.9")
        client.credentials(HTTP_X_AGENT_TOKEN=token)
        return client

    def heartbeat(self, client: APIClient) -> Any:
        return client.post("/api/agents/heartbeat/", {}, format="json")

    def test_the_request_after_sixty_refusals_is_throttled_whatever_its_token(self) -> None:
        statuses = {self.heartbeat(self.intruder()).status_code for _ in range(60)}
        self.assertEqual(statuses, {401})

        self.assertThrottled(self.heartbeat(self.intruder()))
        self.assertThrottled(self.heartbeat(self.intruder(self.agent_token)))
        self.assertThrottled(self.intruder().get("/api/agents/poll_commands/"))

    def test_refused_polls_count_too(self) -> None:
        for _ in range(60):
            self.assertEqual(self.intruder().get("/api/agents/poll_commands/").status_code, 401)

        self.assertThrottled(self.intruder().get("/api/agents/poll_commands/"))
        self.assertThrottled(self.heartbeat(self.intruder()))

    def test_an_agent_at_another_address_is_not_slowed(self) -> None:
        for _ in range(61):
            self.heartbeat(self.intruder())

        self.assertEqual(self.heartbeat(self.agent_client).status_code, 200)
        self.assertEqual(self.agent_client.get("/api/agents/poll_commands/").status_code, 200)

    def test_an_agent_that_authenticates_is_not_counted(self) -> None:
        for _ in range(61):
            self.assertEqual(self.heartbeat(self.agent_client).status_code, 200)


class PollThrottleTestCase(ThrottleTestCase):
    """120 polls a minute per agent (TETHER_POLL_RATE), counted in the process's memory."""

    def poll(self, client: APIClient | None = None) -> Any:
        return (client or self.agent_client).get("/api/agents/poll_commands/?wait=0")

    def test_the_poll_after_120_in_a_minute_is_throttled(self) -> None:
        statuses = {self.poll().status_code for _ in range(120)}
        self.assertEqual(statuses, {200})

        self.assertThrottled(self.poll())
        # Only its polls: its output and results still arrive.
        response = self.agent_client.post("/api/agents/heartbeat/", {}, format="json")
        self.assertEqual(response.status_code, 200)

    def test_polls_that_carry_work_away_never_count(self) -> None:
        """An operator sending 200 commands back to back is not slowed by the agent's polls."""
        for _ in range(200):
            self.queue()
            with self.captureOnCommitCallbacks(execute=True):
                pass
            response = self.poll()
            self.assertEqual(response.status_code, 200, response.content)
            self.assertEqual(len(json.loads(response.content)["commands"]), 1)

    def test_another_agent_polls_on(self) -> None:
        other = fleet_services.register_agent(server=self.server, hostname="web-2")
        other_client = APIClient()
        other_client.credentials(HTTP_X_AGENT_TOKEN=other.token)
        for _ in range(121):
            self.poll()

        self.assertEqual(self.poll(other_client).status_code, 200)
        self.assertEqual(json.loads(self.poll(other_client).content)["commands"], [])
