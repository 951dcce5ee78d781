"""GET /api/audit/ (issue 13, row 8): staff read every event, a user their own; filters by
actor, action (exact or prefix), target and time; a bad filter is a 400; where from is the
request's peer as the throttles see it."""

from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from tether.accounts.models import AuditEvent
from tether.accounts.services import audit
from tether.commands import services as command_services
from tether.fleet import services as fleet_services

from ..base import BaseTestCase, User


class AuditTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        AuditEvent.objects.all().delete()  # setUpTestData's own server.create lines
        self.admin = User.objects.create_user("admin", is_staff=True)

    def events(self, client: APIClient | None = None, **query: str) -> list[dict]:
        response = (client or self.client).get("/api/audit/", query)
        self.assertEqual(response.status_code, 200, response.content)
        return response.json()["results"]

    def actions(self, client: APIClient | None = None, **query: str) -> list[str]:
        return [event["action"] for event in self.events(client, **query)]


class VisibilityTestCase(AuditTestCase):
    def test_a_user_reads_their_own_events_newest_first(self) -> None:
        sent = self.queue("uptime")
        command_services.cancel_command(command=sent, user=self.alice)

        events = self.events()

        self.assertEqual([e["action"] for e in events], ["command.cancel", "command.send"])
        self.assertEqual(events[0]["actor"], "alice")
        self.assertEqual(events[0]["target"], f"command:{sent.pk}")
        self.assertEqual(events[1]["details"], {"agent": self.agent.pk})

    def test_another_users_events_are_invisible(self) -> None:
        command_services.queue_command(agent=self.bob_agent, command="id", user=self.bob)
        self.queue("uptime")

        self.assertEqual(self.actions(), ["command.send"])
        self.assertEqual(self.actions(actor="bob"), [])
        self.assertEqual([e["actor"] for e in self.events(self.client_for(self.bob))], ["bob"])

    def test_staff_read_every_event(self) -> None:
        command_services.queue_command(agent=self.bob_agent, command="id", user=self.bob)
        self.queue("uptime")

        actors = [e["actor"] for e in self.events(self.client_for(self.admin))]

        self.assertEqual(actors, ["alice", "bob"])

    def test_it_needs_a_login(self) -> None:
        self.assertError(APIClient().get("/api/audit/"), 401)

    def test_it_only_allows_get(self) -> None:
        self.assertError(self.post_json("/api/audit/", {}), 405)


class FilterTestCase(AuditTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.staff = self.client_for(self.admin)
        self.sent = self.queue("uptime")
        command_services.queue_command(agent=self.bob_agent, command="id", user=self.bob)
        fleet_services.update_server(server=self.server, user=self.alice, name="alice-www")
        self.client.post(  # a registration: no actor
            "/api/agents/register/",
            {"server_token": self.server_token, "hostname": "web-9"},
            format="json",
        )

    def test_it_filters_by_actor(self) -> None:
        self.assertEqual(self.actions(self.staff, actor="bob"), ["command.send"])
        self.assertEqual(self.actions(self.staff, actor="nobody"), [])

    def test_it_filters_by_exact_action(self) -> None:
        self.assertEqual(self.actions(self.staff, action="server.update"), ["server.update"])
        self.assertEqual(self.actions(self.staff, action="server."), ["server.update"])
        self.assertEqual(self.actions(self.staff, action="server"), [])

    def test_it_filters_by_action_prefix(self) -> None:
        audit(user=self.alice, action="agentx.other", target=self.agent)  # not agent.*

        self.assertEqual(self.actions(self.staff, action="command."), ["command.send"] * 2)
        self.assertEqual(self.actions(self.staff, action="agent."), ["agent.register"])

    def test_it_filters_by_target_type_and_id(self) -> None:
        by_type = self.events(self.staff, target="command")
        by_id = self.events(self.staff, target=f"command:{self.sent.pk}")

        self.assertEqual(len(by_type), 2)
        self.assertEqual([e["target"] for e in by_id], [f"command:{self.sent.pk}"])
        self.assertEqual(self.events(self.staff, target="command:999999"), [])

    def test_it_filters_by_time(self) -> None:
        old = timezone.now() - timedelta(days=2)
        AuditEvent.objects.filter(action="server.update").update(at=old)

        recent = self.actions(self.staff, since=(old + timedelta(days=1)).isoformat())
        early = self.actions(self.staff, until=(old + timedelta(seconds=1)).isoformat())

        self.assertNotIn("server.update", recent)
        self.assertEqual(len(recent), 3)
        self.assertEqual(early, ["server.update"])

    def test_empty_filters_mean_any(self) -> None:
        everything = self.actions(self.staff, actor="", action="", target="", since="")

        self.assertEqual(len(everything), 4)

    def test_a_bad_filter_is_refused(self) -> None:
        for query in (
            {"since": "yesterday"},
            {"until": "2026-13-40"},
            {"target": "command:1:2 x"},
            {"target": "Command;"},
            {"action": "x" * 65},
            {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        ):
            with self.subTest(query=query):
                self.assertError(self.staff.get("/api/audit/", query), 400, "invalid")

    def test_the_query_count_does_not_grow_with_the_page(self) -> None:
        def queries() -> int:
            with CaptureQueriesContext(connection) as captured:
                self.assertEqual(self.staff.get("/api/audit/").status_code, 200)
            return len(captured)

        few = queries()
        for i in range(30):
            who = self.alice if i % 2 else self.bob
            audit(user=who, action="command.send", target=self.sent, n=i)

        self.assertEqual(queries(), few)


class OriginTestCase(AuditTestCase):
    def test_it_records_where_a_human_action_came_from(self) -> None:
        client = APIClient(REMOTE_ADDR="192.0.2.7", HTTP_USER_AGENT="curl/8.0 " + "x" * 500)
        client.force_authenticate(self.alice)

        response = client.post(
            f"/api/agents/{self.agent.pk}/send_command/", {"command": "id"}, format="json"
        )

        self.assertEqual(response.status_code, 201, response.content)
        event = self.events()[0]
        self.assertEqual(event["address"], "192.0.2.7")
        self.assertEqual(event["user_agent"], ("curl/8.0 " + "x" * 500)[:256])

    def test_a_forwarded_for_header_counts_only_behind_a_proxy(self) -> None:
        client = APIClient(REMOTE_ADDR="192.0.2.7", HTTP_X_FORWARDED_FOR="203.0.113.5")
        client.force_authenticate(self.alice)
        body = {"command": "id"}
        url = f"/api/agents/{self.agent.pk}/send_command/"

        client.post(url, body, format="json")
        with override_settings(REST_FRAMEWORK={**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}):
            client.post(url, body, format="json")

        self.assertEqual([e["address"] for e in self.events()], ["203.0.113.5", "192.0.2.7"])

    def test_an_action_outside_a_request_has_no_address(self) -> None:
        self.queue("uptime")

        event = AuditEvent.objects.get()
        self.assertEqual((event.address, event.user_agent), (None, ""))

    def test_a_registration_is_recorded_new_then_rotated(self) -> None:
        agent_client = APIClient(REMOTE_ADDR="198.51.100.4", HTTP_USER_AGENT="tether-agent")
        body = {"server_token": self.server_token, "hostname": "web-7"}

        first = agent_client.post("/api/agents/register/", body, format="json")
        again = agent_client.post("/api/agents/register/", body, format="json")

        self.assertEqual(first.status_code, 201, first.content)
        self.assertEqual(again.status_code, 201, again.content)
        agent_id = first.json()["agent_id"]
        events = self.events(self.client_for(self.admin), action="agent.register")
        self.assertEqual([e["details"]["new"] for e in events], [False, True])
        for event in events:
            self.assertIsNone(event["actor"])
            self.assertEqual(event["target"], f"agent:{agent_id}")
            self.assertEqual(event["address"], "198.51.100.4")
            self.assertEqual(event["user_agent"], "tether-agent")
            self.assertEqual(event["details"]["hostname"], "web-7")
            self.assertEqual(event["details"]["server"], self.server.pk)
        # Nobody's own event: a user does not see registrations.
        self.assertEqual(self.events(action="agent.register"), [])
