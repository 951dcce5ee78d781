"""The sweep: silent agents go offline; their in-flight commands end `lost` after a grace."""

from datetime import timedelta

from django.test import override_settings
from django.utils import timezone

from tether.commands.models import Command
from tether.commands.services import mark_lost_commands
from tether.fleet.models import Agent
from tether.fleet.services import mark_offline_agents, record_heartbeat, register_agent

from ..base import BaseTestCase

# Offline after 3 x 10 s of silence; lost 60 s after that.
TIMERS = {"HEARTBEAT_INTERVAL": 10, "LOST_GRACE": 60}
LOST_AFTER = 3 * 10 + 60


def seconds_ago(seconds: float):
    return timezone.now() - timedelta(seconds=seconds)


@override_settings(**TIMERS)
class MarkLostCommandsTestCase(BaseTestCase):
    def set_agent(self, status: str, silent_for: float | None) -> None:
        heartbeat = None if silent_for is None else seconds_ago(silent_for)
        Agent.objects.filter(pk=self.agent.pk).update(status=status, last_heartbeat=heartbeat)

    def test_it_marks_running_commands_lost_and_leaves_deliveries_to_their_lease(self) -> None:
        delivered = self.delivered("sleep 1")
        running = self.running("sleep 2")
        self.set_agent("offline", silent_for=LOST_AFTER + 5)

        self.assertEqual(mark_lost_commands(), 1)

        running.refresh_from_db()
        self.assertEqual(running.status, "lost")
        self.assertIsNotNone(running.finished_at)
        self.assertIsNone(running.lease_expires_at)
        self.assertIn("offline", running.error)
        # Never started: delivered again when the agent is back (DESIGN §3), or it expires.
        delivered.refresh_from_db()
        self.assertEqual(delivered.status, "delivered")

    def test_it_leaves_queued_and_finished_commands_alone(self) -> None:
        finished = self.running("true")
        self.result(finished.pk, success=True, exit_code=0)
        queued = self.queue("later")
        self.set_agent("offline", silent_for=LOST_AFTER + 5)

        self.assertEqual(mark_lost_commands(), 0)

        queued.refresh_from_db()
        finished.refresh_from_db()
        self.assertEqual(queued.status, "queued")
        self.assertEqual(finished.status, "succeeded")

    def test_it_waits_out_the_grace_period(self) -> None:
        running = self.running()
        self.set_agent("offline", silent_for=LOST_AFTER - 5)

        self.assertEqual(mark_lost_commands(), 0)

        running.refresh_from_db()
        self.assertEqual(running.status, "running")

    def test_it_leaves_online_agents_commands_alone(self) -> None:
        running = self.running()
        # Silent long enough, but the sweeper has not called it offline: it is not lost yet.
        self.set_agent("online", silent_for=LOST_AFTER + 5)

        self.assertEqual(mark_lost_commands(), 0)

        running.refresh_from_db()
        self.assertEqual(running.status, "running")

    def test_it_treats_an_agent_that_never_reported_as_silent(self) -> None:
        running = self.running()
        self.set_agent("offline", silent_for=None)

        mark_lost_commands()

        running.refresh_from_db()
        self.assertEqual(running.status, "lost")

    def test_it_only_touches_the_silent_agent(self) -> None:
        mine = self.running()
        bobs = self.queue(agent=self.bob_agent)
        self.deliver(agent=self.bob_agent)
        self.set_agent("offline", silent_for=LOST_AFTER + 5)
        Agent.objects.filter(pk=self.bob_agent.pk).update(
            status="online", last_heartbeat=seconds_ago(1)
        )

        self.assertEqual(mark_lost_commands(), 1)

        self.assertEqual(Command.objects.get(pk=mine.pk).status, "lost")
        self.assertEqual(Command.objects.get(pk=bobs.pk).status, "delivered")

    def test_a_late_result_replaces_lost_with_what_really_happened(self) -> None:
        running = self.running()
        self.set_agent("offline", silent_for=LOST_AFTER + 5)
        mark_lost_commands()
        self.assertEqual(Command.objects.get(pk=running.pk).status, "lost")

        self.progress(running.pk, stdout="late\n", offset_stdout=0)
        response = self.result(running.pk, success=True, exit_code=0, stdout_size=5)

        self.assertEqual(response.status_code, 200, response.content)
        running.refresh_from_db()
        self.assertEqual((running.status, running.exit_code), ("succeeded", 0))
        self.assertEqual(self.read(running.pk)["stdout"], "late\n")

    def test_a_second_lost_report_changes_nothing(self) -> None:
        running = self.running()
        self.set_agent("offline", silent_for=LOST_AFTER + 5)
        mark_lost_commands()

        response = self.result(running.pk, status="lost", success=False)

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(Command.objects.get(pk=running.pk).status, "lost")

    def test_it_marks_a_command_past_its_report_deadline_lost(self) -> None:
        running = self.running()
        Command.objects.filter(pk=running.pk).update(
            report_deadline=timezone.now() - timedelta(seconds=1)
        )

        self.assertEqual(mark_lost_commands(), 1)

        self.assertEqual(Command.objects.get(pk=running.pk).status, "lost")

    def test_it_leaves_a_command_within_its_report_deadline_alone(self) -> None:
        running = self.running()

        self.assertEqual(mark_lost_commands(), 0)

        running.refresh_from_db()
        self.assertEqual(running.status, "running")
        self.assertGreater(running.report_deadline, timezone.now())

    def test_registering_again_marks_the_agents_active_commands_lost(self) -> None:
        running = self.running()

        register_agent(server=self.server, hostname=self.agent.hostname)

        self.assertEqual(Command.objects.get(pk=running.pk).status, "lost")

    def test_it_works_through_the_offline_sweep(self) -> None:
        running = self.running()
        self.set_agent("online", silent_for=LOST_AFTER + 5)

        self.assertEqual(mark_offline_agents(), 1)
        self.assertEqual(mark_lost_commands(), 1)

        running.refresh_from_db()
        self.assertEqual(running.status, "lost")


@override_settings(**TIMERS)
class MarkOfflineAgentsTestCase(BaseTestCase):
    def set_agent(self, agent: Agent, status: str, silent_for: float | None) -> None:
        heartbeat = None if silent_for is None else seconds_ago(silent_for)
        Agent.objects.filter(pk=agent.pk).update(status=status, last_heartbeat=heartbeat)

    def test_it_flips_stale_online_agents_offline(self) -> None:
        self.set_agent(self.agent, "online", silent_for=31)

        self.assertEqual(mark_offline_agents(), 1)

        self.agent.refresh_from_db()
        self.assertEqual(self.agent.status, "offline")

    def test_it_leaves_fresh_agents_online(self) -> None:
        self.set_agent(self.agent, "online", silent_for=29)

        self.assertEqual(mark_offline_agents(), 0)

        self.agent.refresh_from_db()
        self.assertEqual(self.agent.status, "online")

    def test_it_leaves_other_states_alone(self) -> None:
        for status in ("pending", "stopped", "upgrading"):
            with self.subTest(status=status):
                self.set_agent(self.agent, status, silent_for=1000)
                mark_offline_agents()
                self.agent.refresh_from_db()
                self.assertEqual(self.agent.status, status)

    def test_a_heartbeat_brings_an_offline_agent_back(self) -> None:
        self.set_agent(self.agent, "online", silent_for=31)
        mark_offline_agents()
        self.agent.refresh_from_db()

        record_heartbeat(agent=self.agent)

        self.agent.refresh_from_db()
        self.assertEqual(self.agent.status, "online")
        self.assertEqual(mark_offline_agents(), 0)
