"""Queued work expires: a command no agent took within TETHER_COMMAND_EXPIRE ends `expired`."""

from datetime import timedelta
from typing import Any
from unittest.mock import patch

from django.db import connection
from django.test import override_settings
from django.utils import timezone

from tether.commands import services
from tether.commands.models import Command, Run
from tether.fleet import services as fleet_services

from ..base import BaseTestCase

S = Command.Status
HOUR = 3600


def age(command: Command, seconds: float) -> None:
    """Move the command's expiry `seconds` into the past (as if that much time had passed)."""
    Command.objects.filter(pk=command.pk).update(
        expires_at=timezone.now() - timedelta(seconds=seconds)
    )


@override_settings(COMMAND_EXPIRE=HOUR)
class ExpireQueuedCommandsTestCase(BaseTestCase):
    def test_a_command_expires_a_command_expire_after_it_is_queued(self) -> None:
        before = timezone.now()
        command = self.queue()

        expected = before + timedelta(seconds=HOUR)
        self.assertLess(abs((command.expires_at - expected).total_seconds()), 5)

    def test_a_delivery_never_started_expires_once_its_lease_ran_out(self) -> None:
        """Its agent went away before starting it and never came back (the lost sweep leaves
        such deliveries alone, to be delivered again if it does)."""
        held = self.delivered("held")
        stale = self.delivered("stale")
        age(held, 1)
        age(stale, 1)
        Command.objects.filter(pk=stale.pk).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )

        # While the agent is around, a delivery it lost is delivered again, not expired.
        self.assertEqual(services.expire_queued_commands(), 0)
        self.agent.status = "offline"
        self.agent.save(update_fields=["status"])

        self.assertEqual(services.expire_queued_commands(), 1)

        held.refresh_from_db()
        stale.refresh_from_db()
        self.assertEqual(held.status, S.DELIVERED)  # its lease runs: the agent has it
        self.assertEqual(stale.status, S.EXPIRED)

    @override_settings(COMMAND_EXPIRE=0)
    def test_zero_means_a_command_waits_forever(self) -> None:
        self.assertIsNone(self.queue().expires_at)

    def test_it_expires_a_queued_command_past_its_expiry(self) -> None:
        command = self.queue()
        age(command, 1)

        self.assertEqual(services.expire_queued_commands(), 1)

        command.refresh_from_db()
        self.assertEqual(command.status, S.EXPIRED)
        self.assertIsNotNone(command.finished_at)
        self.assertIn("expired", command.error)
        self.assertEqual(self.read(command.pk)["status"], "expired")

    def test_it_leaves_a_queued_command_within_its_time_alone(self) -> None:
        command = self.queue()

        self.assertEqual(services.expire_queued_commands(), 0)

        command.refresh_from_db()
        self.assertEqual(command.status, S.QUEUED)

    def test_a_command_an_agent_has_never_expires(self) -> None:
        delivered, running = self.delivered(), self.running()
        for command in (delivered, running):
            age(command, 1)

        self.assertEqual(services.expire_queued_commands(), 0)

        delivered.refresh_from_db()
        running.refresh_from_db()
        self.assertEqual((delivered.status, running.status), (S.DELIVERED, S.RUNNING))

    def test_an_expired_command_is_not_handed_out_nor_cancelled(self) -> None:
        command = self.queue()
        age(command, 1)
        services.expire_queued_commands()

        self.assertEqual(self.deliver(), [])
        response = self.client.post(f"/api/commands/{command.pk}/cancel/")
        self.assertError(response, 409, "already_final")

    def test_an_agent_report_does_not_revive_it(self) -> None:
        command = self.queue()
        age(command, 1)
        services.expire_queued_commands()

        self.result(command.pk, success=True, exit_code=0)

        command.refresh_from_db()
        self.assertEqual(command.status, S.EXPIRED)

    def test_one_sweep_expires_at_most_a_batch_oldest_first(self) -> None:
        commands = [self.queue(f"c{n}") for n in range(3)]
        for n, command in enumerate(commands):
            age(command, 10 - n)

        with patch.object(services, "EXPIRE_BATCH", 2):
            self.assertEqual(services.expire_queued_commands(), 2)
            self.assertEqual(services.expire_queued_commands(), 1)

        statuses = Command.objects.filter(pk__in=[c.pk for c in commands]).values_list("status")
        self.assertEqual({s for (s,) in statuses}, {S.EXPIRED})

    def test_the_sweep_reads_the_status_expiry_index(self) -> None:
        if connection.vendor != "sqlite":
            self.skipTest("the plan checked is SQLite's")
        plan = services.past_expiry(timezone.now()).values_list("id", "run_id")[:1000].explain()

        self.assertIn("command_status_expiry", plan)
        self.assertNotIn("TEMP B-TREE", plan)  # read in index order, not sorted


class WithRunsTestCase(BaseTestCase):
    """Three online agents of Alice's, for runs."""

    def setUp(self) -> None:
        super().setUp()
        self.agents = [self.agent]
        for n in range(2, 4):
            registration = fleet_services.register_agent(server=self.server, hostname=f"web-{n}")
            self.agents.append(registration.agent)
        for agent in self.agents:
            fleet_services.record_heartbeat(agent=agent)

    def start(self, **body: Any) -> dict:
        body = {"command": "uptime", "targets": {"all": True}, **body}
        response = self.client.post("/api/runs/", body, format="json")
        self.assertEqual(response.status_code, 201, response.content)
        return response.json()

    def targets(self, run: dict) -> list[Command]:
        return list(Command.objects.filter(run_id=run["id"]).order_by("id"))


@override_settings(COMMAND_EXPIRE=HOUR)
class RunTargetExpiryTestCase(WithRunsTestCase):
    def test_a_held_target_does_not_expire_and_counts_from_its_release(self) -> None:
        run = self.start(max_concurrency=1)
        first, second, third = self.targets(run)
        self.assertEqual((first.status, second.status), (S.QUEUED, S.HELD))
        self.assertIsNone(second.expires_at)
        age(first, 1)

        services.expire_queued_commands()

        second.refresh_from_db()
        self.assertEqual(second.status, S.QUEUED)  # released in the expired one's place
        self.assertGreater(second.expires_at, timezone.now() + timedelta(seconds=HOUR - 60))

    def test_an_expired_target_counts_against_max_errors(self) -> None:
        run = self.start(max_concurrency=1, max_errors=0)
        first = self.targets(run)[0]
        age(first, 1)

        with self.captureOnCommitCallbacks(execute=True):
            services.expire_queued_commands()

        detail = self.client.get(f"/api/runs/{run['id']}/").json()
        self.assertEqual(detail["status"], Run.Status.FAILED)
        self.assertEqual(detail["counts"]["expired"], 1)
        self.assertEqual(detail["counts"]["cancelled"], 2)
        self.assertIn("max_errors (0) exceeded: 1 targets failed", detail["reason"])

    def test_a_run_whose_targets_all_expire_ends_failed(self) -> None:
        run = self.start()
        for command in self.targets(run):
            age(command, 1)

        services.expire_queued_commands()

        detail = self.client.get(f"/api/runs/{run['id']}/").json()
        self.assertEqual(detail["status"], Run.Status.FAILED)
        self.assertEqual(detail["counts"]["expired"], 3)


@override_settings(COMMAND_EXPIRE=HOUR)
class ExpiresInTestCase(WithRunsTestCase):
    def send(self, **body: Any) -> Any:
        return self.client.post(
            f"/api/agents/{self.agent.pk}/send_command/", {"command": "true", **body}, format="json"
        )

    def test_a_command_may_say_how_long_it_waits(self) -> None:
        response = self.send(expires_in=60)

        self.assertEqual(response.status_code, 201, response.content)
        expires_at = Command.objects.get(pk=response.json()["id"]).expires_at
        self.assertLess(expires_at, timezone.now() + timedelta(seconds=61))
        self.assertGreater(expires_at, timezone.now() + timedelta(seconds=50))
        self.assertIsNotNone(response.json()["expires_at"])

    def test_a_bad_expires_in_is_refused_and_queues_nothing(self) -> None:
        for value in (0, -1, "soon", 10**12, None):
            with self.subTest(value=value):
                self.assertError(self.send(expires_in=value), 400)
        self.assertFalse(Command.objects.exists())

    def test_a_runs_targets_wait_its_expires_in_from_their_release(self) -> None:
        run = self.start(max_concurrency=1, expires_in=120)

        first, second, _ = self.targets(run)
        self.assertEqual(run["expires_in"], 120)
        self.assertLess(first.expires_at, timezone.now() + timedelta(seconds=121))
        self.assertIsNone(second.expires_at)
        age(first, 1)
        services.expire_queued_commands()
        second.refresh_from_db()
        self.assertLess(second.expires_at, timezone.now() + timedelta(seconds=121))
        self.assertGreater(second.expires_at, timezone.now() + timedelta(seconds=100))
