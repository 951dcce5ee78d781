"""POST /api/commands/{id}/cancel/: queued ones at once, live ones through the agent."""

from datetime import timedelta

from django.utils import timezone

from tether.accounts.models import AuditEvent
from tether.commands import services
from tether.commands.models import Command

from ..base import BaseTestCase


class CancelTestCase(BaseTestCase):
    def cancel(self, command: Command, client=None):
        return (client or self.client).post(f"/api/commands/{command.pk}/cancel/")

    def test_it_cancels_a_queued_command_at_once(self) -> None:
        command = self.queue()

        response = self.cancel(command)

        self.assertEqual(response.status_code, 202, response.content)
        self.assertEqual(response.json()["status"], "cancelled")
        command.refresh_from_db()
        self.assertEqual(command.status, "cancelled")
        self.assertIsNotNone(command.finished_at)
        # ... and the agent never receives it.
        self.assertEqual(self.deliver(), [])

    def test_it_asks_the_agent_to_cancel_a_delivered_command(self) -> None:
        command = self.delivered()

        response = self.cancel(command)

        self.assertEqual(response.status_code, 202, response.content)
        self.assertTrue(response.json()["cancel_requested"])
        command.refresh_from_db()
        self.assertEqual(command.status, "delivered")
        self.assertTrue(command.cancel_requested)
        self.assertIsNone(command.finished_at)

        delivery = services.claim_commands(agent=self.agent)
        self.assertEqual(delivery.cancel, [command.pk])
        self.assertEqual(delivery.commands, [])

    def test_it_asks_the_agent_to_cancel_a_running_command(self) -> None:
        command = self.running()

        self.cancel(command)

        self.assertEqual(services.claim_commands(agent=self.agent).cancel, [command.pk])
        # The agent also hears of it in its next progress answer.
        body = self.progress(command.pk, stdout="x", offset_stdout=0).json()
        self.assertTrue(body["cancel"])

    def test_the_agent_reports_the_cancelled_command(self) -> None:
        command = self.running()
        self.cancel(command)

        self.result(command.pk, status="cancelled", exit_code=-15)

        command.refresh_from_db()
        self.assertEqual(command.status, "cancelled")
        self.assertEqual(services.claim_commands(agent=self.agent).cancel, [])

    def test_it_does_not_list_other_agents_cancels(self) -> None:
        command = self.delivered()
        self.cancel(command)

        self.assertEqual(services.claim_commands(agent=self.bob_agent).cancel, [])

    def test_it_writes_an_audit_event(self) -> None:
        command = self.queue()

        self.cancel(command)

        event = AuditEvent.objects.get(action="command.cancel")
        self.assertEqual(event.user, self.alice)
        self.assertEqual(event.target_id, str(command.pk))

    def test_it_refuses_a_finished_command(self) -> None:
        command = self.running()
        self.result(command.pk, success=True, exit_code=0)

        self.assertError(self.cancel(command), 409, "already_final")
        command.refresh_from_db()
        self.assertEqual(command.status, "succeeded")
        self.assertFalse(command.cancel_requested)

    def test_it_refuses_a_cancelled_command(self) -> None:
        command = self.queue()
        self.cancel(command)

        self.assertError(self.cancel(command), 409, "already_final")
        self.assertEqual(AuditEvent.objects.filter(action="command.cancel").count(), 1)

    def test_it_validates_ownership(self) -> None:
        command = self.queue(agent=self.bob_agent)

        self.assertError(self.cancel(command), 404, "not_found")
        command.refresh_from_db()
        self.assertEqual(command.status, "queued")

    def test_it_handles_missing_command(self) -> None:
        self.assertError(self.client.post("/api/commands/999999/cancel/"), 404)

    def test_it_only_allows_post(self) -> None:
        command = self.queue()

        self.assertError(self.client.get(f"/api/commands/{command.pk}/cancel/"), 405)


class CancelDeliveryTestCase(BaseTestCase):
    """How a pending cancel reaches the agent: once, then again only every CANCEL_RESEND."""

    def test_a_pending_cancel_is_sent_once_then_resent_later(self) -> None:
        command = self.running()
        services.cancel_command(command=command, user=self.alice)

        self.assertEqual(services.claim_commands(agent=self.agent).cancel, [command.pk])
        # Told already: the next poll is not answered early for it.
        self.assertEqual(services.claim_commands(agent=self.agent).cancel, [])

        Command.objects.filter(pk=command.pk).update(
            cancel_sent_at=timezone.now() - services.CANCEL_RESEND - timedelta(seconds=1)
        )
        self.assertEqual(services.claim_commands(agent=self.agent).cancel, [command.pk])

    def test_a_cancelled_command_whose_lease_ran_out_is_not_handed_out_again(self) -> None:
        command = self.delivered()
        services.cancel_command(command=command, user=self.alice)
        Command.objects.filter(pk=command.pk).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1), cancel_sent_at=None
        )

        delivery = services.claim_commands(agent=self.agent)

        self.assertEqual(delivery.commands, [])
        self.assertEqual(delivery.cancel, [command.pk])
        command.refresh_from_db()
        self.assertEqual(command.delivery_count, 1)
