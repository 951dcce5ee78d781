"""POST /api/agents/{id}/send_command/: queue a line, an argv, or a rendered template."""

import shlex

from django.conf import settings

from tether.accounts.models import AuditEvent
from tether.commands.command_templates import validate_parameters
from tether.commands.models import Command, CommandTemplate

from ..base import BaseTestCase


class SendCommandTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.url = f"/api/agents/{self.agent.pk}/send_command/"

    def send(self, body: dict, client=None):
        return self.post_json(self.url, body, client)

    def make_template(self, owner=None, **fields) -> CommandTemplate:
        defaults = {
            "name": "list",
            "command": "ls -l {path}",
            "parameters": [{"name": "path", "type": "string", "default": "/"}],
        }
        fields = {**defaults, **fields}
        # As the template API stores them: parameters normalised by validate_parameters.
        fields["parameters"] = validate_parameters(fields["command"], fields["parameters"])
        return CommandTemplate.objects.create(owner=owner or self.alice, **fields)

    def assertRefused(self, body: dict, code: str = "invalid") -> dict:
        error = self.assertError(self.send(body), 400, code)
        self.assertFalse(Command.objects.exists())
        return error

    def test_it_works(self) -> None:
        response = self.send({"command": "uptime"})

        self.assertEqual(response.status_code, 201, response.content)
        body = response.json()
        command = Command.objects.get()
        self.assertEqual(body["id"], command.pk)
        self.assertEqual(body["agent"], self.agent.pk)
        self.assertEqual(body["command"], "uptime")
        self.assertIsNone(body["args"])
        self.assertEqual(body["status"], "queued")
        self.assertEqual(body["timeout"], settings.COMMAND_TIMEOUT_DEFAULT)
        self.assertEqual(body["created_by"], "alice")
        self.assertEqual(body["stdout"], "")
        self.assertEqual(command.created_by, self.alice)
        self.assertEqual(command.kind, "shell")

    def test_it_keeps_args_and_timeout(self) -> None:
        response = self.send({"command": "/bin/echo", "args": ["a b", "", "$HOME"], "timeout": 9})

        self.assertEqual(response.status_code, 201, response.content)
        command = Command.objects.get()
        self.assertEqual(command.args, ["a b", "", "$HOME"])
        self.assertEqual(command.timeout, 9)

    def test_it_keeps_whitespace_in_the_command(self) -> None:
        self.send({"command": "  printf 'a\\n'  "})

        self.assertEqual(Command.objects.get().command, "  printf 'a\\n'  ")

    def test_it_writes_an_audit_event(self) -> None:
        self.send({"command": "uptime"})

        event = AuditEvent.objects.get(action="command.send")
        self.assertEqual(event.user, self.alice)
        self.assertEqual(event.target_type, "command")
        self.assertEqual(event.target_id, str(Command.objects.get().pk))
        self.assertEqual(event.details, {"agent": self.agent.pk})

    def test_it_renders_a_template(self) -> None:
        template = self.make_template(timeout=42)

        response = self.send({"template": template.pk, "params": {"path": "; touch /tmp/pwned"}})

        self.assertEqual(response.status_code, 201, response.content)
        command = Command.objects.get()
        self.assertEqual(shlex.split(command.command), ["ls", "-l", "; touch /tmp/pwned"])
        self.assertEqual(command.timeout, 42)

    def test_it_uses_template_defaults(self) -> None:
        template = self.make_template()

        response = self.send({"template": template.pk})

        self.assertEqual(response.status_code, 201, response.content)
        self.assertEqual(Command.objects.get().command, "ls -l /")

    def test_an_explicit_timeout_beats_the_templates(self) -> None:
        template = self.make_template(timeout=42)

        self.send({"template": template.pk, "timeout": 7})

        self.assertEqual(Command.objects.get().timeout, 7)

    def test_it_handles_missing_template(self) -> None:
        self.assertRefused({"template": 999999})

    def test_it_validates_template_ownership(self) -> None:
        template = self.make_template(owner=self.bob)

        self.assertRefused({"template": template.pk})

    def test_it_refuses_bad_template_params(self) -> None:
        template = self.make_template(
            command="head -n {n} f", parameters=[{"name": "n", "type": "integer"}]
        )
        for params in ({}, {"n": "x"}, {"n": 1, "other": 2}):
            with self.subTest(params=params):
                error = self.assertRefused({"template": template.pk, "params": params})
                self.assertIn("params", error["fields"])

    def test_it_refuses_an_unknown_field(self) -> None:
        error = self.assertRefused({"command": "uptime", "shell": "/bin/zsh"})
        self.assertIn("shell", error["message"])

    def test_it_refuses_a_zero_timeout(self) -> None:
        self.assertRefused({"command": "uptime", "timeout": 0})

    def test_it_refuses_a_timeout_over_the_maximum(self) -> None:
        self.assertRefused({"command": "uptime", "timeout": settings.COMMAND_TIMEOUT_MAX + 1})

    def test_it_refuses_a_timeout_that_is_not_a_number(self) -> None:
        self.assertRefused({"command": "uptime", "timeout": "soon"})

    def test_it_refuses_a_blank_command(self) -> None:
        for command in ("", "   ", "\n"):
            with self.subTest(command=command):
                self.assertRefused({"command": command})

    def test_it_refuses_a_missing_command(self) -> None:
        self.assertRefused({})

    def test_it_refuses_a_command_that_is_not_a_string(self) -> None:
        self.assertRefused({"command": ["ls", "-l"]})

    def test_it_refuses_args_that_are_not_strings(self) -> None:
        self.assertRefused({"command": "echo", "args": "a b"})
        self.assertRefused({"command": "echo", "args": [{"a": 1}]})

    def test_it_refuses_both_command_and_template(self) -> None:
        template = self.make_template()

        self.assertRefused({"command": "uptime", "template": template.pk})

    def test_it_refuses_params_without_a_template(self) -> None:
        self.assertRefused({"command": "uptime", "params": {"path": "/"}})

    def test_it_refuses_args_with_a_template(self) -> None:
        template = self.make_template()

        self.assertRefused({"template": template.pk, "args": ["-a"]})

    def test_it_refuses_a_body_that_is_not_an_object(self) -> None:
        self.assertRefused(["uptime"])

    def test_it_validates_ownership(self) -> None:
        response = self.post_json(
            f"/api/agents/{self.bob_agent.pk}/send_command/", {"command": "id"}
        )

        self.assertError(response, 404, "not_found")
        self.assertFalse(Command.objects.exists())

    def test_it_handles_missing_agent(self) -> None:
        self.assertError(self.post_json("/api/agents/999999/send_command/", {"command": "id"}), 404)

    def test_it_requires_authentication(self) -> None:
        self.client.force_authenticate(None)

        self.assertError(self.send({"command": "id"}), 401)
        self.assertFalse(Command.objects.exists())

    def test_it_only_allows_post(self) -> None:
        self.assertError(self.client.get(self.url), 405)

    def test_staff_may_send_to_any_agent(self) -> None:
        self.bob.is_staff = True
        self.bob.save()

        response = self.send({"command": "id"}, client=self.client_for(self.bob))

        self.assertEqual(response.status_code, 201, response.content)
        self.assertEqual(Command.objects.get().created_by, self.bob)


class TemplateIdBoundsTestCase(BaseTestCase):
    def test_a_template_id_past_any_row_is_refused_not_a_server_error(self) -> None:
        url = f"/api/agents/{self.agent.pk}/send_command/"
        for template in (0, 2**64):
            with self.subTest(template=template):
                self.assertError(self.post_json(url, {"template": template}), 400, "invalid")
        self.assertFalse(Command.objects.exists())
