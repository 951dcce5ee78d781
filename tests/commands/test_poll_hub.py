"""What a held long-poll costs: no database work of its own while it waits. Work reaches it
by notification, or through the hub's one periodic query for all held polls; heartbeats are
written in batches; credentials come from the in-process cache."""

import asyncio
import time
from datetime import timedelta
from typing import Any
from unittest import mock

from asgiref.sync import sync_to_async
from django.db import connection
from django.test import AsyncClient, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tests.base import BaseTestCase
from tether.commands import poll, services
from tether.commands.models import Command
from tether.fleet import authentication, heartbeats
from tether.fleet import services as fleet_services
from tether.fleet.models import Agent


class HeldPollTestCase(BaseTestCase):
    async def poll(self, wait: float, token: str | None = None) -> Any:
        headers = {"X-Agent-Token": token or self.agent_token}
        return await AsyncClient().get(f"/api/agents/poll_commands/?wait={wait}", headers=headers)

    async def warm(self) -> None:
        """Polls until the credential is cached, the agent online, the hub ready: the first
        poll brings the agent online (a change: this process's cached view goes), the
        second loads it again as it now is."""
        await self.poll(0)
        await self.poll(0)
        deadline = time.monotonic() + 5
        while not poll.hub.ready:
            self.assertLess(time.monotonic(), deadline, "the hub never ran its query")
            await asyncio.sleep(0.01)

    @override_settings(POLL_RECHECK=0.05, HEARTBEAT_INTERVAL=1)
    async def test_held_polls_do_not_query_on_a_timer_of_their_own(self) -> None:
        await self.warm()
        with (
            mock.patch.object(
                services, "claim_for_agents", wraps=services.claim_for_agents
            ) as claims,
            mock.patch.object(poll, "_tick", wraps=poll._tick) as ticks,
        ):
            # Three polls held for 1 s: twenty re-check periods each.
            answers = await asyncio.gather(*(self.poll(1) for _ in range(3)))

        self.assertEqual([a.json()["commands"] for a in answers], [[], [], []])
        self.assertEqual(claims.call_count, 0, "a held poll read the queue itself")
        # The process's own timer ran all along: one query per period, whatever the polls.
        self.assertGreaterEqual(ticks.call_count, 5)
        self.assertLess(ticks.call_count, 40)

    @override_settings(POLL_RECHECK=0.05, HEARTBEAT_INTERVAL=1)
    async def test_work_no_notification_announced_is_found_by_the_hub(self) -> None:
        """A row written without a wake-up (another process on SQLite, say) still reaches the
        held poll, through the one periodic query."""
        await self.warm()
        held = asyncio.ensure_future(self.poll(5))
        await asyncio.sleep(0.1)
        command = await sync_to_async(Command.objects.create)(
            agent=self.agent, command="echo quietly", timeout=9
        )

        started = time.monotonic()
        response = await held

        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual([c["id"] for c in response.json()["commands"]], [command.pk])

    @override_settings(POLL_RECHECK=0.05, HEARTBEAT_INTERVAL=1, COMMAND_LEASE=0.2)
    async def test_a_lease_that_runs_out_hands_the_command_out_again(self) -> None:
        await self.warm()
        command = await sync_to_async(self.delivered)()

        response = await self.poll(5)

        self.assertEqual([c["id"] for c in response.json()["commands"]], [command.pk])
        await sync_to_async(command.refresh_from_db)()
        self.assertEqual(command.delivery_count, 2)

    async def test_a_cached_token_is_forgotten_when_the_agent_registers_again(self) -> None:
        await self.warm()
        await sync_to_async(self.reregister)()

        response = await self.poll(0)

        self.assertError(response, 401)

    def reregister(self) -> None:
        with self.captureOnCommitCallbacks(execute=True):
            fleet_services.register_agent(server=self.server, hostname=self.agent.hostname)

    async def test_a_cached_poll_authenticates_without_the_database(self) -> None:
        await self.warm()

        with mock.patch.object(poll, "credential_for", wraps=poll.credential_for) as lookups:
            response = await self.poll(0)

        self.assertEqual(response.status_code, 200, response.content)
        lookups.assert_not_called()


class ClaimBatchTestCase(BaseTestCase):
    @override_settings(POLL_RECHECK=0.05, HEARTBEAT_INTERVAL=1)
    async def test_polls_woken_together_claim_together(self) -> None:
        registrations = await sync_to_async(
            lambda: [
                fleet_services.register_agent(server=self.server, hostname=f"w{i}")
                for i in range(12)
            ]
        )()
        tokens = [r.token for r in registrations]
        for _ in range(2):  # bring each online, then cache it as it now is
            await asyncio.gather(*(self.poll(t, 0) for t in tokens))
        held = [asyncio.ensure_future(self.poll(t, 5)) for t in tokens]
        await asyncio.sleep(0.2)

        with mock.patch.object(
            services, "claim_for_agents", wraps=services.claim_for_agents
        ) as claims:
            queued = await sync_to_async(self.queue_for_all)([r.agent for r in registrations])
            answers = await asyncio.gather(*held)

        got = [[c["id"] for c in a.json()["commands"]] for a in answers]
        self.assertEqual(got, [[c.pk] for c in queued])
        self.assertLess(claims.call_count, 6, "each woken poll claimed on its own")

    async def poll(self, token: str, wait: float) -> Any:
        return await AsyncClient().get(
            f"/api/agents/poll_commands/?wait={wait}", headers={"X-Agent-Token": token}
        )

    def queue_for_all(self, agents: list[Agent]) -> list[Command]:
        with self.captureOnCommitCallbacks(execute=True):
            return [self.queue("echo together", agent=agent) for agent in agents]


class HeartbeatBatchTestCase(BaseTestCase):
    def test_one_update_writes_many_heartbeats(self) -> None:
        old = timezone.now() - timedelta(hours=1)
        agents = [
            fleet_services.register_agent(server=self.server, hostname=f"h{i}").agent
            for i in range(30)
        ]
        Agent.objects.filter(pk__in=[a.pk for a in agents]).update(
            last_heartbeat=old, status=Agent.Status.OFFLINE
        )
        Agent.objects.filter(pk=agents[0].pk).update(status=Agent.Status.UPGRADING)
        Agent.objects.filter(pk=agents[1].pk).update(status=Agent.Status.STOPPED)
        for agent in agents:
            heartbeats.note(agent.pk)

        with CaptureQueriesContext(connection) as queries:
            self.assertEqual(heartbeats.flush(), 30)

        self.assertEqual(len(queries.captured_queries), 1)
        rows = Agent.objects.filter(pk__in=[a.pk for a in agents])
        self.assertFalse(rows.filter(last_heartbeat=old).exists())
        # A sign of life brings an offline agent back; an upgrading one stays so, and a
        # stopped one too (the heartbeat may predate the stop: its next poll revives it).
        self.assertEqual(rows.filter(status=Agent.Status.ONLINE).count(), 28)
        self.assertEqual(rows.get(pk=agents[0].pk).status, Agent.Status.UPGRADING)
        self.assertEqual(rows.get(pk=agents[1].pk).status, Agent.Status.STOPPED)
        self.assertEqual(heartbeats.flush(), 0)


class CredentialCacheTestCase(BaseTestCase):
    def test_a_credential_read_before_a_forget_is_not_cached(self) -> None:
        """A rotation committed between the cache's read and its store would otherwise leave
        the old row cached, and the old token accepted, for the cache's whole lifetime."""
        real_get = Agent.objects.get

        def get_then_rotate(**lookup: Any) -> Agent:
            agent = real_get(**lookup)
            authentication.forget_agent(agent.pk)  # what the rotation's notification does
            return agent

        with mock.patch.object(Agent.objects, "get", side_effect=get_then_rotate):
            authentication.credential_for(self.agent_token)

        self.assertIsNone(authentication.cached_credential(self.agent_token))
        authentication.credential_for(self.agent_token)
        self.assertIsNotNone(authentication.cached_credential(self.agent_token))
