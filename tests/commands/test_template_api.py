"""CRUD /api/agents/command-templates/: own templates only, and every change audited."""

from tether.accounts.models import AuditEvent
from tether.commands.models import CommandTemplate

from ..base import BaseTestCase

URL = "/api/agents/command-templates/"
BODY = {
    "name": "disk",
    "command": "df -h {path}",
    "parameters": [{"name": "path", "type": "string"}],
}


class TemplateApiTestCase(BaseTestCase):
    def actions(self) -> list[str]:
        return list(
            AuditEvent.objects.filter(action__startswith="template.")
            .order_by("id")
            .values_list("action", flat=True)
        )

    def test_create_update_delete_are_each_audited(self) -> None:
        created = self.post_json(URL, BODY)
        self.assertEqual(created.status_code, 201, created.content)
        template_id = created.json()["id"]

        updated = self.patch_json(f"{URL}{template_id}/", {"description": "free space"})
        self.assertEqual(updated.status_code, 200, updated.content)
        deleted = self.client.delete(f"{URL}{template_id}/")

        self.assertEqual(deleted.status_code, 204)
        self.assertFalse(CommandTemplate.objects.exists())
        self.assertEqual(self.actions(), ["template.create", "template.update", "template.delete"])
        self.assertEqual(AuditEvent.objects.filter(action="template.create").get().user, self.alice)

    def test_another_users_template_answers_404_and_stays(self) -> None:
        template_id = self.post_json(URL, BODY, client=self.client_for(self.bob)).json()["id"]

        self.assertError(self.client.delete(f"{URL}{template_id}/"), 404)
        self.assertError(self.patch_json(f"{URL}{template_id}/", {"name": "x"}), 404)
        self.assertEqual(CommandTemplate.objects.get().name, "disk")
