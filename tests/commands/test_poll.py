"""Handing out commands: claim_commands, and the long-poll that wraps it."""

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from unittest.mock import patch

from asgiref.sync import sync_to_async
from django.db.models import QuerySet
from django.test import AsyncClient, override_settings
from django.utils import timezone

from tether.commands.models import Command
from tether.commands.services import claim_commands

from ..base import BaseTestCase


class ClaimCommandsTestCase(BaseTestCase):
    def test_it_hands_out_queued_commands_oldest_first(self) -> None:
        first, second = self.queue("first"), self.queue("second")

        delivery = claim_commands(agent=self.agent)

        self.assertEqual([c.pk for c in delivery.commands], [first.pk, second.pk])
        for command in delivery.commands:
            self.assertEqual(command.status, "delivered")
            self.assertEqual(command.delivery_count, 1)
            self.assertGreater(command.lease_expires_at, timezone.now())

    def test_it_hands_a_command_out_once_per_lease(self) -> None:
        self.queue()
        claim_commands(agent=self.agent)

        self.assertEqual(claim_commands(agent=self.agent).commands, [])

    def test_it_hands_a_command_out_again_when_the_lease_ran_out(self) -> None:
        command = self.delivered()
        Command.objects.filter(pk=command.pk).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )

        [again] = claim_commands(agent=self.agent).commands

        self.assertEqual(again.pk, command.pk)
        self.assertEqual(again.delivery_count, 2)

    def test_it_does_not_hand_out_an_acknowledged_command(self) -> None:
        command = self.running()
        Command.objects.filter(pk=command.pk).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )

        self.assertEqual(claim_commands(agent=self.agent).commands, [])

    def test_it_hands_out_at_most_the_limit(self) -> None:
        for i in range(5):
            self.queue(f"c{i}")

        self.assertEqual(len(claim_commands(agent=self.agent, limit=3).commands), 3)
        self.assertEqual(len(claim_commands(agent=self.agent, limit=3).commands), 2)

    def test_a_command_cancelled_between_its_read_and_the_claim_is_not_handed_out(self) -> None:
        first, second = self.queue("first"), self.queue("second")
        update = QuerySet.update

        def cancel_first_then_update(queryset: QuerySet, **fields: Any) -> int:
            # Another transaction's cancel, after the claim read the rows (PostgreSQL).
            if fields.get("status") == Command.Status.DELIVERED:
                update(Command.objects.filter(pk=first.pk), status=Command.Status.CANCELLED)
            return update(queryset, **fields)

        with patch.object(QuerySet, "update", autospec=True, side_effect=cancel_first_then_update):
            delivery = claim_commands(agent=self.agent)

        self.assertEqual([c.pk for c in delivery.commands], [second.pk])
        self.assertEqual(delivery.commands[0].status, "delivered")
        first.refresh_from_db()
        self.assertEqual(first.status, "cancelled")

    def test_it_only_hands_out_the_agents_own_commands(self) -> None:
        self.queue(agent=self.bob_agent)

        self.assertEqual(claim_commands(agent=self.agent).commands, [])


class PollTestCase(BaseTestCase):
    async def poll(self, path: str = "/api/agents/poll_commands/?wait=0", method: str = "get"):
        headers = {"X-Agent-Token": self.agent_token}
        return await getattr(AsyncClient(), method)(path, headers=headers)

    async def aqueue(self, command: str = "echo hello") -> Command:
        return await sync_to_async(self.queue)(command, args=["a"], timeout=9)

    async def test_it_works(self) -> None:
        command = await self.aqueue()

        response = await self.poll()

        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        [delivered] = body["commands"]
        self.assertEqual(delivered["id"], command.pk)
        self.assertEqual(delivered["kind"], "shell")
        self.assertEqual(delivered["command"], "echo hello")
        self.assertEqual(delivered["args"], ["a"])
        self.assertEqual(delivered["timeout"], 9)
        self.assertEqual(body["cancel"], [])
        self.assertIn("long_poll_timeout", body["config"])

    async def test_every_poll_is_a_heartbeat(self) -> None:
        await self.poll("/api/agents/poll_commands/?wait=0&version=1.2.3&rpc_port=7000")

        agent = await sync_to_async(lambda: type(self.agent).objects.get(pk=self.agent.pk))()
        self.assertEqual(agent.status, "online")
        self.assertIsNotNone(agent.last_heartbeat)
        self.assertEqual((agent.version, agent.rpc_port), ("1.2.3", 7000))

    async def test_it_answers_at_once_without_wait(self) -> None:
        started = time.monotonic()

        response = await self.poll("/api/agents/poll_commands/")

        self.assertEqual(response.json()["commands"], [])
        self.assertLess(time.monotonic() - started, 1)

    async def open_poll(self, version: str = "9.9.9", wait: int = 10) -> asyncio.Task:
        """Start a long-poll and return once it is waiting: it records the heartbeat (with
        `version`) and claims in one database step, so once the agent row shows `version` the
        poll has found nothing and waits for a wake-up."""
        path = f"/api/agents/poll_commands/?wait={wait}&version={version}"
        poll = asyncio.ensure_future(self.poll(path))
        deadline = time.monotonic() + 5
        while await sync_to_async(self.agent_version)() != version:
            self.assertFalse(poll.done(), "the poll answered before it waited")
            self.assertLess(time.monotonic(), deadline, "the poll did not start waiting")
            await asyncio.sleep(0.01)
        return poll

    def agent_version(self) -> str:
        return type(self.agent).objects.values_list("version", flat=True).get(pk=self.agent.pk)

    def committed(self, change: Callable[[], Any]) -> Any:
        """Make `change` and run its on-commit callbacks (the wake-ups) as a commit would;
        TestCase itself never commits."""
        with self.captureOnCommitCallbacks(execute=True):
            return change()

    # A re-check far beyond the poll's wait: only a wake-up can answer these polls in time.
    @override_settings(POLL_RECHECK=60)
    async def test_it_answers_as_soon_as_a_command_is_queued(self) -> None:
        started = time.monotonic()
        poll = await self.open_poll(wait=10)

        command = await sync_to_async(self.committed)(lambda: self.queue(args=["a"]))
        response = await poll

        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual([c["id"] for c in response.json()["commands"]], [command.pk])

    @override_settings(POLL_RECHECK=60)
    async def test_it_answers_as_soon_as_a_delivered_command_is_cancelled(self) -> None:
        command = await sync_to_async(self.delivered)()
        started = time.monotonic()
        poll = await self.open_poll(wait=10)

        cancelled = await sync_to_async(self.committed)(
            lambda: self.client.post(f"/api/commands/{command.pk}/cancel/")
        )
        response = await poll

        self.assertEqual(cancelled.status_code, 202, cancelled.content)
        self.assertLess(time.monotonic() - started, 5)
        body = response.json()
        self.assertEqual(body["cancel"], [command.pk])
        self.assertEqual(body["commands"], [])

    async def test_the_older_paths_answer_alike(self) -> None:
        await self.aqueue("one")
        await self.aqueue("two")

        legacy = await self.poll("/api/agents/poll/?wait=0")
        self.assertEqual(len(legacy.json()["commands"]), 2)

        deprecated = await self.poll("/api/agents/command/", method="post")
        self.assertEqual(deprecated.status_code, 200, deprecated.content)
        self.assertEqual(deprecated["Deprecation"], "true")
        self.assertEqual(deprecated.json()["commands"], [])
