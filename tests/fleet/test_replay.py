"""Replayed agent requests (issue 13, row 6): every signed request carries a nonce, signed
with it and remembered for the window; a request seen once is refused the second time."""

import secrets
import time

from asgiref.sync import sync_to_async
from django.db import connection
from django.test import AsyncClient

from tether.commands.models import Command
from tether.fleet import nonces

from .test_signing import HEARTBEAT, SignedAgentTestCase

POLL = "/api/agents/poll_commands/?wait=0"


def fresh() -> str:
    return secrets.token_hex(16)


class ReplayedTestCase(SignedAgentTestCase):
    def assertReplayed(self, response) -> None:
        # Told apart from a bad credential: the agent signs again instead of registering again.
        self.assertError(response, 401, "replayed")


class ReplayTestCase(ReplayedTestCase):
    def test_a_replayed_request_is_refused_and_changes_nothing(self) -> None:
        body = b'{"version": "2.0.0"}'
        headers = self.headers("POST", HEARTBEAT, body, nonce=fresh())
        self.assertEqual(self.post(HEARTBEAT, body, headers).status_code, 200)
        self.signed.refresh_from_db()
        seen = self.signed.last_heartbeat

        replay = self.post(HEARTBEAT, body, headers)

        self.assertReplayed(replay)
        self.signed.refresh_from_db()
        self.assertEqual(self.signed.last_heartbeat, seen)

    def test_a_replay_with_another_nonce_does_not_verify(self) -> None:
        headers = self.headers("POST", HEARTBEAT, b"{}", nonce=fresh())
        self.post(HEARTBEAT, b"{}", headers)
        headers["X-Tether-Nonce"] = fresh()  # the signature covers the nonce

        self.assertRefused(self.post(HEARTBEAT, b"{}", headers))

    def test_a_malformed_nonce_is_refused(self) -> None:
        for nonce in ("short", "x" * 65, "a" * 20 + "\n", "a" * 20 + " ;"):
            with self.subTest(nonce=nonce):
                headers = self.headers("POST", HEARTBEAT, b"{}", nonce="a" * 32)
                headers["X-Tether-Nonce"] = nonce
                self.assertRefused(self.post(HEARTBEAT, b"{}", headers))

    def test_an_agent_that_sent_a_nonce_must_send_one_from_then_on(self) -> None:
        # An agent of an earlier release signs without one, and is still served...
        self.assertEqual(self.heartbeat().status_code, 200)
        # ...until it (upgraded in place, same credentials) sends its first nonce.
        first = self.headers("POST", HEARTBEAT, b"{}", nonce=fresh())
        self.assertEqual(self.post(HEARTBEAT, b"{}", first).status_code, 200)

        self.assertRefused(self.heartbeat())
        self.signed.refresh_from_db()
        self.assertTrue(self.signed.sends_nonces)

    def test_another_agent_may_use_the_same_nonce(self) -> None:
        nonce = fresh()
        self.post(HEARTBEAT, b"{}", self.headers("POST", HEARTBEAT, b"{}", nonce=nonce))
        self.assertTrue(nonces.remember(self.agent.pk, nonce, str(int(time.time()))))

    def test_the_shared_record_outlives_the_process_memory(self) -> None:
        """On PostgreSQL another process's memory is not this one's: the table refuses."""
        nonce, now = fresh(), str(int(time.time()))
        self.assertTrue(nonces.remember(self.signed.pk, nonce, now))
        nonces.forget_all()  # as another process would see it

        again = nonces.remember(self.signed.pk, nonce, now)

        self.assertEqual(again, connection.vendor != "postgresql")

    def test_the_sweep_forgets_nonces_past_their_window(self) -> None:
        old = str(int(time.time()) - 10_000)
        nonces.remember(self.signed.pk, fresh(), old)
        nonces.remember(self.signed.pk, fresh(), str(int(time.time())))

        nonces.prune()

        from tether.fleet.models import AgentNonce

        expected = 1 if connection.vendor == "postgresql" else 0
        self.assertEqual(AgentNonce.objects.count(), expected)


class ReplayedPollTestCase(ReplayedTestCase):
    """The issue's case: a captured poll, replayed once a command is queued, took it."""

    def queue_and_tell(self) -> Command:
        with self.captureOnCommitCallbacks(execute=True):  # the hub hears of it, as live
            return self.queue(agent=self.signed)

    async def test_a_replayed_poll_takes_nothing(self) -> None:
        headers = self.headers("GET", POLL, nonce=fresh())
        first = await AsyncClient().get(POLL, headers=headers)
        self.assertEqual(first.status_code, 200, first.content)
        command = await sync_to_async(self.queue_and_tell)()

        replay = await AsyncClient().get(POLL, headers=headers)

        self.assertReplayed(replay)
        await command.arefresh_from_db()
        self.assertEqual(command.status, Command.Status.QUEUED)
        # The agent's own next poll, with a fresh nonce, gets it at once.
        again = await AsyncClient().get(POLL, headers=self.headers("GET", POLL, nonce=fresh()))
        self.assertEqual([c["id"] for c in again.json()["commands"]], [command.pk])
