"""Wake-ups: queueing or cancelling a command wakes the agent's long-poll (and a cancel the
command's watchers) as soon as the change is committed, not at the poll's next re-check.

Django's TestCase never commits, so each change runs its on-commit callbacks through
captureOnCommitCallbacks, as a real commit would."""

from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async

from tether import wakeups
from tether.commands.models import Command

from ..base import BaseTestCase

# How long a waiter may take to wake: a wake-up is one event-loop turn, a re-check seconds.
WAKE_DEADLINE = 2


class WakeupTestCase(BaseTestCase):
    def committed(self, change: Callable[[], Any]) -> Any:
        """Make `change`, then run its on-commit callbacks as a commit would."""
        with self.captureOnCommitCallbacks(execute=True):
            return change()

    async def acommitted(self, change: Callable[[], Any]) -> Any:
        return await sync_to_async(self.committed)(change)


class QueueWakeupTestCase(WakeupTestCase):
    async def test_queueing_a_command_wakes_the_agents_poll(self) -> None:
        with wakeups.subscribe(wakeups.agent_key(self.agent.pk)) as waiter:
            await self.acommitted(self.queue)

            self.assertTrue(await waiter.wait(WAKE_DEADLINE), "the poll was not woken")

    async def test_it_wakes_only_that_agents_poll(self) -> None:
        with (
            wakeups.subscribe(wakeups.agent_key(self.agent.pk)) as alices,
            wakeups.subscribe(wakeups.agent_key(self.bob_agent.pk)) as bobs,
        ):
            await self.acommitted(lambda: self.queue(agent=self.bob_agent))

            self.assertTrue(await bobs.wait(WAKE_DEADLINE), "Bob's poll was not woken")
            # Both wake-ups would have been delivered in the same loop turn.
            self.assertFalse(alices.event.is_set(), "Alice's poll was woken for Bob's command")

    async def test_it_wakes_the_poll_only_once_the_command_is_committed(self) -> None:
        def queue_uncommitted() -> list[Callable[[], Any]]:
            with self.captureOnCommitCallbacks() as callbacks:
                self.queue()
            return callbacks

        with wakeups.subscribe(wakeups.agent_key(self.agent.pk)) as waiter:
            callbacks = await sync_to_async(queue_uncommitted)()
            # A poll woken now would look for the command before it can see it.
            self.assertFalse(waiter.event.is_set(), "the poll was woken before the commit")

            for callback in callbacks:
                await sync_to_async(callback)()

            self.assertTrue(await waiter.wait(WAKE_DEADLINE), "the commit did not wake the poll")


class CancelWakeupTestCase(WakeupTestCase):
    def cancel(self, command: Command) -> None:
        response = self.client.post(f"/api/commands/{command.pk}/cancel/")
        self.assertEqual(response.status_code, 202, response.content)

    async def test_cancelling_a_delivered_command_wakes_the_agents_poll(self) -> None:
        command = await sync_to_async(self.delivered)()

        with wakeups.subscribe(wakeups.agent_key(self.agent.pk)) as waiter:
            await self.acommitted(lambda: self.cancel(command))

            self.assertTrue(await waiter.wait(WAKE_DEADLINE), "the poll was not woken")

    async def test_cancelling_a_command_wakes_its_watchers(self) -> None:
        command = await sync_to_async(self.running)()

        with wakeups.subscribe(wakeups.command_key(command.pk)) as waiter:
            await self.acommitted(lambda: self.cancel(command))

            self.assertTrue(await waiter.wait(WAKE_DEADLINE), "the watchers were not woken")
