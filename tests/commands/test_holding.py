"""A command the agent holds in its local queue keeps its lease while the agent polls
(`holding` on the poll), and is handed out again once the agent stops saying so."""

from datetime import timedelta

from asgiref.sync import sync_to_async
from django.test import AsyncClient, override_settings
from django.utils import timezone

from tether.commands import holding
from tether.commands.models import Command

from ..base import BaseTestCase

S = Command.Status


@override_settings(COMMAND_LEASE=30, LONG_POLL_TIMEOUT=25, HEARTBEAT_INTERVAL=30)
class HoldingTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        holding.discard()

    async def poll(self, query: str) -> tuple[int, dict]:
        response = await AsyncClient().get(
            f"/api/agents/poll_commands/?wait=0&{query}",
            headers={"X-Agent-Token": self.agent_token},
        )
        return response.status_code, response.json()

    def lease_runs_out(self, command: Command) -> None:
        Command.objects.filter(pk=command.pk).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )

    def lease_of(self, command: Command):
        return Command.objects.values_list("lease_expires_at", flat=True).get(pk=command.pk)

    async def test_a_held_command_keeps_its_lease_and_is_not_handed_out_again(self) -> None:
        command = await sync_to_async(self.delivered)()
        await sync_to_async(self.lease_runs_out)(command)

        status, body = await self.poll(f"holding={command.pk}")
        await sync_to_async(holding.flush)()

        self.assertEqual(status, 200, body)
        self.assertEqual(body["commands"], [])
        lease = await sync_to_async(self.lease_of)(command)
        # A whole long-poll and a lease beyond it: the next poll says it again in time.
        self.assertGreater(lease, timezone.now() + timedelta(seconds=25 + 30 - 5))
        self.assertEqual(await sync_to_async(self.deliver)(), [])

    def test_it_is_handed_out_again_once_the_agent_stops_saying_it_holds_it(self) -> None:
        command = self.delivered()
        holding.note(self.agent.pk, frozenset({command.pk}))
        holding.flush()
        self.lease_runs_out(command)  # the agent died: no poll extended it again

        [again] = self.deliver()

        self.assertEqual((again.pk, again.delivery_count), (command.pk, 2))

    def test_it_extends_only_the_agents_own_delivered_commands(self) -> None:
        mine = self.delivered()
        running = self.running()
        theirs = self.queue(agent=self.bob_agent)
        self.deliver(agent=self.bob_agent)
        for command in (mine, running, theirs):
            self.lease_runs_out(command)
        before = {c.pk: self.lease_of(c) for c in (running, theirs)}

        holding.note(self.agent.pk, frozenset({mine.pk, running.pk, theirs.pk}))

        self.assertEqual(holding.flush(), 1)
        self.assertGreater(self.lease_of(mine), timezone.now())
        self.assertEqual({c.pk: self.lease_of(c) for c in (running, theirs)}, before)
        [again] = self.deliver(agent=self.bob_agent)
        self.assertEqual(again.pk, theirs.pk)

    async def test_bad_holding_values_are_refused_and_change_nothing(self) -> None:
        command = await sync_to_async(self.delivered)()
        too_many = ",".join(str(n) for n in range(1, holding.MAX_IDS + 2))
        for value in ("abc", f"{command.pk},x", f"{command.pk},", "-1", "²", str(2**63), too_many):
            with self.subTest(value=value[:20]):
                status, body = await self.poll(f"holding={value}")
                self.assertEqual(status, 400, body)
                self.assertEqual(set(body), {"error"})
        self.assertEqual(await sync_to_async(holding.flush)(), 0)

    async def test_a_poll_without_holding_notes_nothing(self) -> None:
        await sync_to_async(self.delivered)()

        status, _ = await self.poll("version=1.0.0")

        self.assertEqual(status, 200)
        self.assertEqual(await sync_to_async(holding.flush)(), 0)
