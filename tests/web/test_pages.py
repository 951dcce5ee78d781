"""The web UI's pages, in process: who may see what, CSRF on every form, and output that is
always text. The browser tier (tests/web/test_browser.py) drives the live parts."""

from django.test import Client

from tether.accounts.models import AuditEvent
from tether.commands import services as command_services
from tether.commands.models import Command, CommandTemplate
from tether.commands.output import Chunk
from tether.commands.reports import Result
from tether.fleet import services as fleet_services
from tether.fleet.models import Agent, Server

from ..base import BaseTestCase, User

XSS = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"


class WebTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.client = Client()
        self.client.force_login(self.alice)

    def finished(self, stdout: bytes, command: str = "echo hi") -> Command:
        cmd = self.running(command)
        command_services.record_result(
            agent=self.agent,
            command_id=cmd.pk,
            result=Result(status="succeeded", exit_code=0, chunks=[Chunk("stdout", stdout, 0)]),
        )
        return cmd


class AnonymousTestCase(WebTestCase):
    def test_it_sends_anonymous_visitors_to_login(self) -> None:
        anonymous = Client()
        for url in ("/", f"/agents/{self.agent.pk}/", "/servers/", "/templates/"):
            response = anonymous.get(url)
            self.assertEqual(response.status_code, 302, url)
            self.assertTrue(response["Location"].startswith("/login/?next="), url)

    def test_it_logs_in_with_username_and_password(self) -> None:
        User.objects.create_user("carol", password="carol-pw-123")
        client = Client(enforce_csrf_checks=True)
        page = client.get("/login/")
        self.assertContains(page, 'name="username"')
        self.assertContains(page, 'name="password"')
        token = page.cookies["csrftoken"].value
        response = client.post(
            "/login/",
            {"username": "carol", "password": "carol-pw-123", "csrfmiddlewaretoken": token},
        )
        self.assertRedirects(response, "/", fetch_redirect_response=False)
        self.assertEqual(client.get("/").status_code, 200)

    def test_it_refuses_a_login_without_csrf(self) -> None:
        User.objects.create_user("carol", password="carol-pw-123")
        client = Client(enforce_csrf_checks=True)
        response = client.post("/login/", {"username": "carol", "password": "carol-pw-123"})
        self.assertEqual(response.status_code, 403)

    def test_it_logs_out_on_post(self) -> None:
        response = self.client.post("/logout/")
        self.assertRedirects(response, "/login/", fetch_redirect_response=False)
        self.assertEqual(self.client.get("/").status_code, 302)


class FleetPageTestCase(WebTestCase):
    def test_it_lists_only_the_users_agents(self) -> None:
        response = self.client.get("/")
        self.assertContains(response, "web-1")
        self.assertContains(response, "alice-web")
        self.assertNotContains(response, "db-1")
        self.assertContains(response, 'id="count-total">1<')

    def test_the_fragment_filters_by_status_and_hostname(self) -> None:
        self.assertContains(self.client.get("/fleet/rows/?q=web"), "web-1")
        self.assertNotContains(self.client.get("/fleet/rows/?q=nomatch"), "web-1")
        self.assertNotContains(self.client.get("/fleet/rows/?status=stopped"), "web-1")

    def tagged_and_untagged(self) -> tuple[Agent, Agent]:
        """Two more of Alice's agents: one tagged "db", one tagged otherwise (web-1 has none)."""
        tagged = fleet_services.register_agent(server=self.server, hostname="tagged-host").agent
        other = fleet_services.register_agent(server=self.server, hostname="other-host").agent
        Agent.objects.filter(pk=tagged.pk).update(tags=["prod", "db"])
        Agent.objects.filter(pk=other.pk).update(tags=["prod", "dbx"])
        return tagged, other

    def test_the_page_filters_by_tag(self) -> None:
        tagged, other = self.tagged_and_untagged()

        response = self.client.get("/?tag=db")

        self.assertContains(response, f'data-agent="{tagged.pk}"')
        self.assertContains(response, "tagged-host")
        self.assertNotContains(response, f'data-agent="{other.pk}"')
        self.assertNotContains(response, "other-host")
        self.assertNotContains(response, f'data-agent="{self.agent.pk}"')

    def test_the_search_matches_hostnames_and_server_names_as_the_api_does(self) -> None:
        other_server, _ = fleet_services.create_server(
            owner=self.alice, name="billing-db", host="10.0.0.7"
        )
        on_it = fleet_services.register_agent(server=other_server, hostname="node-9").agent

        by_server = self.client.get("/fleet/rows/?q=billing")
        by_host = self.client.get("/fleet/rows/?q=web-1")

        self.assertContains(by_server, f'data-agent="{on_it.pk}"')
        self.assertNotContains(by_server, f'data-agent="{self.agent.pk}"')
        self.assertContains(by_host, f'data-agent="{self.agent.pk}"')
        self.assertNotContains(by_host, f'data-agent="{on_it.pk}"')
        api = self.client.get("/api/agents/?search=billing").json()
        self.assertEqual([a["id"] for a in api["results"]], [on_it.pk])

    def test_the_fragment_filters_by_tag(self) -> None:
        tagged, other = self.tagged_and_untagged()

        response = self.client.get("/fleet/rows/?tag=db")

        self.assertContains(response, f'data-agent="{tagged.pk}"')
        self.assertContains(response, "tagged-host")
        self.assertNotContains(response, f'data-agent="{other.pk}"')
        self.assertNotContains(response, "other-host")
        self.assertNotContains(response, f'data-agent="{self.agent.pk}"')

    def test_the_tag_filter_shows_only_the_users_agents(self) -> None:
        Agent.objects.filter(pk=self.bob_agent.pk).update(tags=["db"])
        tagged, _ = self.tagged_and_untagged()

        response = self.client.get("/fleet/rows/?tag=db")

        self.assertContains(response, f'data-agent="{tagged.pk}"')
        self.assertNotContains(response, f'data-agent="{self.bob_agent.pk}"')
        self.assertNotContains(response, "db-1")

    def test_it_escapes_names(self) -> None:
        fleet_services.update_server(server=self.server, user=self.alice, name=XSS)
        response = self.client.get("/")
        self.assertNotContains(response, XSS)
        self.assertContains(response, ESCAPED)


class AgentPageTestCase(WebTestCase):
    def test_it_shows_the_agent_with_a_command_form(self) -> None:
        response = self.client.get(f"/agents/{self.agent.pk}/")
        self.assertContains(response, "web-1")
        self.assertContains(response, 'name="command"')
        self.assertContains(response, "csrfmiddlewaretoken")

    def test_a_browser_gets_a_page_for_a_404_and_an_api_client_json(self) -> None:
        url = f"/agents/{self.bob_agent.pk}/"

        page = self.client.get(url, HTTP_ACCEPT="text/html,application/xhtml+xml")

        self.assertEqual(page.status_code, 404)
        self.assertIn(b"<h1>Not found</h1>", page.content)
        self.assertNotIn(b"db-1", page.content)  # says nothing of what is there
        api = self.client.get(f"/api/agents/{self.bob_agent.pk}/")
        self.assertEqual(api.json()["error"]["code"], "not_found")

    def test_a_template_id_that_is_not_a_number_shows_no_parameters(self) -> None:
        url = f"/agents/{self.agent.pk}/template-params/?template=abc"

        response = self.client.get(url)

        self.assertEqual(response.status_code, 200)

    def test_it_answers_404_for_another_users_agent(self) -> None:
        bob_command = self.queue("id", agent=self.bob_agent)
        for url in (
            f"/agents/{self.bob_agent.pk}/",
            f"/agents/{self.bob_agent.pk}/history/",
            f"/commands/{bob_command.pk}/",
            f"/commands/{bob_command.pk}/stdout.txt",
        ):
            self.assertEqual(self.client.get(url).status_code, 404, url)
        for url in (f"/agents/{self.bob_agent.pk}/run/", f"/commands/{bob_command.pk}/cancel/"):
            self.assertEqual(self.client.post(url, {"command": "id"}).status_code, 404, url)
        self.assertEqual(self.bob_agent.commands.count(), 1)

    def test_it_queues_a_command_and_answers_with_its_console(self) -> None:
        response = self.client.post(f"/agents/{self.agent.pk}/run/", {"command": "uptime"})
        command = Command.objects.get(agent=self.agent)
        self.assertEqual((command.command, command.created_by), ("uptime", self.alice))
        self.assertContains(response, f'data-stream="/api/commands/{command.pk}/stream/"')

    def test_it_refuses_a_blank_command(self) -> None:
        response = self.client.post(f"/agents/{self.agent.pk}/run/", {"command": "  "})
        self.assertEqual(response.status_code, 400)
        self.assertFalse(Command.objects.filter(agent=self.agent).exists())

    def test_it_quotes_template_values(self) -> None:
        template = CommandTemplate.objects.create(
            owner=self.alice,
            name="ls",
            command="ls {path}",
            parameters=[{"name": "path", "type": "string", "required": True, "description": ""}],
        )
        response = self.client.post(
            f"/agents/{self.agent.pk}/run/",
            {"template": template.pk, "param_path": "; touch /tmp/pwned"},
        )
        self.assertEqual(response.status_code, 200, response.content)
        command = Command.objects.get(agent=self.agent)
        self.assertEqual(command.command, "ls '; touch /tmp/pwned'")

    def test_it_does_not_run_another_users_template(self) -> None:
        template = CommandTemplate.objects.create(owner=self.bob, name="id", command="id")
        response = self.client.post(f"/agents/{self.agent.pk}/run/", {"template": template.pk})
        self.assertEqual(response.status_code, 400)

    def test_it_requires_csrf_to_run(self) -> None:
        client = Client(enforce_csrf_checks=True)
        client.force_login(self.alice)
        response = client.post(f"/agents/{self.agent.pk}/run/", {"command": "id"})
        self.assertEqual(response.status_code, 403)
        self.assertFalse(Command.objects.filter(agent=self.agent).exists())

    def test_its_status_fragment_is_the_users_only(self) -> None:
        Agent.objects.filter(pk=self.agent.pk).update(status=Agent.Status.OFFLINE)
        Agent.objects.filter(pk=self.bob_agent.pk).update(status=Agent.Status.ONLINE)

        response = self.client.get(f"/agents/{self.agent.pk}/status/")

        self.assertContains(response, "badge")
        self.assertContains(response, '<span class="badge status-offline">offline</span>')
        self.assertNotContains(response, "online")
        bob = self.client.get(f"/agents/{self.bob_agent.pk}/status/")
        self.assertEqual(bob.status_code, 404)
        self.assertNotContains(bob, "online", status_code=404)

    def test_its_status_fragment_follows_the_agent(self) -> None:
        url = f"/agents/{self.agent.pk}/status/"
        Agent.objects.filter(pk=self.agent.pk).update(status=Agent.Status.OFFLINE)
        self.assertContains(self.client.get(url), 'status-offline">offline<')

        Agent.objects.filter(pk=self.agent.pk).update(status=Agent.Status.STOPPED)

        response = self.client.get(url)
        self.assertContains(response, 'status-stopped">stopped<')
        self.assertNotContains(response, "offline")

    def test_it_cancels_a_command(self) -> None:
        command = self.queue("sleep 300")
        response = self.client.post(f"/commands/{command.pk}/cancel/")
        self.assertEqual(response.status_code, 204)
        command.refresh_from_db()
        self.assertEqual(command.status, "cancelled")
        self.assertEqual(self.client.post(f"/commands/{command.pk}/cancel/").status_code, 409)


class CommandPageTestCase(WebTestCase):
    def test_it_escapes_output_and_the_command_line(self) -> None:
        command = self.finished(XSS.encode(), command=f"echo '{XSS}'")
        for url in (f"/commands/{command.pk}/", f"/agents/{self.agent.pk}/history/"):
            response = self.client.get(url)
            self.assertNotContains(response, XSS)
            self.assertContains(response, ESCAPED)

    def test_it_downloads_the_raw_output(self) -> None:
        command = self.finished(b"raw \xff bytes")
        response = self.client.get(f"/commands/{command.pk}/stdout.txt")
        self.assertEqual(response.content, b"raw \xff bytes")
        self.assertEqual(response["Content-Type"], "application/octet-stream")
        self.assertIn("attachment", response["Content-Disposition"])


class ServersPageTestCase(WebTestCase):
    def test_it_adds_a_server_and_shows_its_token_once(self) -> None:
        response = self.client.post(
            "/servers/", {"name": "new", "host": "10.0.0.9", "ssh_user": "root", "ssh_port": 22}
        )
        server = Server.objects.get(owner=self.alice, name="new")
        self.assertContains(response, "--server-token ")
        self.assertContains(response, "--state-dir /var/lib/tether-agent")
        token = response.content.decode().split("--server-token ")[1].split()[0]
        self.assertEqual(fleet_services.server_for_token(token), server)
        self.assertNotContains(self.client.get("/servers/"), token)
        self.assertIn("no-store", response["Cache-Control"])  # not from the back button

    def test_the_agent_command_line_names_the_public_url_not_the_host_header(self) -> None:
        form = {"name": "new", "host": "10.0.0.9", "ssh_user": "root", "ssh_port": 22}
        with self.settings(
            PUBLIC_URL="https://tether.example:8443", ALLOWED_HOSTS=["attacker.example"]
        ):
            response = self.client.post("/servers/", form, HTTP_HOST="attacker.example:1")
        self.assertContains(response, "--server https://tether.example:8443 --server-token ")
        self.assertNotContains(response, "attacker.example")

    def test_a_refused_form_does_not_send_the_private_key_back(self) -> None:
        key = "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-material\n"
        form = {"name": "alice-web", "host": "10.0.0.9", "ssh_user": "root", "ssh_port": 22}

        response = self.client.post("/servers/", {**form, "ssh_private_key": key})

        self.assertEqual(response.status_code, 200)  # the name is taken
        self.assertNotContains(response, "secret-material")

    def test_it_explains_why_an_install_cannot_start(self) -> None:
        response = self.client.post(f"/servers/{self.server.pk}/install/", follow=True)
        self.assertContains(response, "alice-web: ")
        self.assertFalse(self.server.deployments.exists())
        self.assertEqual(
            self.client.post(f"/servers/{self.bob_server.pk}/install/").status_code, 404
        )

    def test_it_rotates_and_deletes_only_own_servers(self) -> None:
        self.assertEqual(
            self.client.post(f"/servers/{self.bob_server.pk}/rotate/").status_code, 404
        )
        self.assertEqual(
            self.client.post(f"/servers/{self.bob_server.pk}/delete/").status_code, 404
        )
        response = self.client.post(f"/servers/{self.server.pk}/rotate/")
        self.assertContains(response, "shown once")
        self.assertIsNone(fleet_services.server_for_token(self.server_token))
        self.client.post(f"/servers/{self.server.pk}/delete/")
        self.assertFalse(Server.objects.filter(pk=self.server.pk).exists())


class TemplatesPageTestCase(WebTestCase):
    def test_it_creates_edits_and_deletes_a_template(self) -> None:
        params = '[{"name": "unit", "type": "string"}]'
        form = {"name": "restart", "command": "systemctl restart {unit}", "parameters": params}
        self.assertRedirects(self.client.post("/templates/", form), "/templates/")
        template = CommandTemplate.objects.get(owner=self.alice, name="restart")
        self.assertEqual(template.parameters[0]["name"], "unit")
        form["command"] = "systemctl status {unit}"
        self.client.post(f"/templates/{template.pk}/", form)
        template.refresh_from_db()
        self.assertEqual(template.command, "systemctl status {unit}")
        self.client.post(f"/templates/{template.pk}/delete/")
        self.assertFalse(CommandTemplate.objects.filter(pk=template.pk).exists())
        audited = AuditEvent.objects.filter(user=self.alice, action__startswith="template.")
        self.assertEqual(
            list(audited.order_by("id").values_list("action", flat=True)),
            ["template.create", "template.update", "template.delete"],
        )

    def test_it_refuses_a_placeholder_inside_quotes(self) -> None:
        params = '[{"name": "unit", "type": "string"}]'
        form = {"name": "bad", "command": "echo '{unit}'", "parameters": params}
        response = self.client.post("/templates/", form)
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "inside quotes")
        self.assertFalse(CommandTemplate.objects.filter(name="bad").exists())

    def test_another_users_template_is_404(self) -> None:
        template = CommandTemplate.objects.create(owner=self.bob, name="id", command="id")
        self.assertEqual(self.client.get(f"/templates/{template.pk}/").status_code, 404)
        self.assertEqual(self.client.post(f"/templates/{template.pk}/delete/").status_code, 404)


class StaticFilesTestCase(WebTestCase):
    def test_it_serves_the_apps_own_files_only(self) -> None:
        self.assertEqual(Client().get("/static/web/tether.css").status_code, 200)
        self.assertEqual(Client().get("/static/web/../views.py").status_code, 404)
        self.assertEqual(Client().get("/static/web/%2e%2e/views.py").status_code, 404)
