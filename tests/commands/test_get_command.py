"""GET /api/commands/{id}/: a command as read, with its output decoded to text."""

from tether.commands import services
from tether.commands.output import Chunk

from ..base import BaseTestCase


class GetCommandTestCase(BaseTestCase):
    def test_it_works(self) -> None:
        command = self.running("printf")
        services.record_progress(
            agent=self.agent,
            command_id=command.pk,
            chunks=[Chunk("stdout", b"caf\xc3\xa9 \xff", 0), Chunk("stderr", b"warn", 0)],
        )

        body = self.read(command.pk)

        self.assertEqual(body["id"], command.pk)
        self.assertEqual(body["agent"], self.agent.pk)
        self.assertEqual(body["status"], "running")
        self.assertEqual(body["stdout"], "café \ufffd")
        self.assertEqual(body["stderr"], "warn")
        self.assertEqual(body["delivery_count"], 1)
        self.assertFalse(body["truncated"])
        for field in ("created_at", "delivered_at", "started_at", "finished_at", "exit_code"):
            self.assertIn(field, body)

    def test_it_validates_ownership(self) -> None:
        command = self.queue(agent=self.bob_agent)

        self.assertError(self.client.get(f"/api/commands/{command.pk}/"), 404, "not_found")

    def test_staff_sees_every_command(self) -> None:
        command = self.queue(agent=self.bob_agent)
        self.alice.is_staff = True
        self.alice.save()

        self.assertEqual(self.client.get(f"/api/commands/{command.pk}/").status_code, 200)

    def test_it_handles_missing_command(self) -> None:
        self.assertError(self.client.get("/api/commands/999999/"), 404, "not_found")

    def test_it_cannot_be_changed_or_deleted(self) -> None:
        command = self.queue()
        url = f"/api/commands/{command.pk}/"

        self.assertError(self.patch_json(url, {"command": "rm -rf /"}), 405)
        self.assertError(self.client.delete(url), 405)
        command.refresh_from_db()
        self.assertEqual(command.command, "echo hello")
