"""The audit log page (/audit/): the API's events and filters as a page, 100 at a time; a
login through the form is an event too."""

from django.test import Client

from tether.accounts.models import AuditEvent
from tether.accounts.services import audit
from tether.commands import services as command_services

from ..base import User
from .test_pages import WebTestCase


class AuditPageTestCase(WebTestCase):
    def setUp(self) -> None:
        super().setUp()
        AuditEvent.objects.all().delete()

    def test_it_lists_the_users_own_events(self) -> None:
        sent = self.queue("uptime")
        command_services.queue_command(agent=self.bob_agent, command="id", user=self.bob)

        response = self.client.get("/audit/")

        self.assertContains(response, f"<code>command:{sent.pk}</code>")
        self.assertContains(response, "<code>command.send</code>", count=1)
        self.assertContains(response, '<a href="/audit/">Audit log</a>')  # the nav link

    def test_it_filters_with_the_apis_filters(self) -> None:
        sent = self.queue("uptime")
        command_services.cancel_command(command=sent, user=self.alice)

        response = self.client.get("/audit/", {"action": "command.cancel", "since": ""})

        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "<code>command.cancel</code>", count=1)
        self.assertNotContains(response, "<code>command.send</code>")
        self.assertContains(response, 'value="command.cancel"')  # the form keeps its filter

    def test_a_bad_filter_says_why(self) -> None:
        self.queue("uptime")

        response = self.client.get("/audit/", {"since": "last tuesday"})

        self.assertContains(response, "since:", status_code=400)
        self.assertNotContains(response, "<code>command.send</code>", status_code=400)

    def test_it_pages_by_a_hundred(self) -> None:
        for i in range(101):
            audit(user=self.alice, action="server.update", target=self.server, n=i)

        first = self.client.get("/audit/")
        second = self.client.get("/audit/", {"page": 2})

        self.assertContains(first, "<code>server.update</code>", count=100)
        self.assertContains(first, "page 1 of 2")
        self.assertContains(second, "<code>server.update</code>", count=1)
        self.assertContains(second, "n=0")  # the oldest comes last

    def test_staff_see_everyones_events(self) -> None:
        self.queue("uptime")
        command_services.queue_command(agent=self.bob_agent, command="id", user=self.bob)
        staff = Client()
        staff.force_login(User.objects.create_user("root", is_staff=True))

        response = staff.get("/audit/", {"actor": "bob"})

        self.assertContains(response, "<code>command.send</code>", count=1)
        self.assertContains(response, "bob")

    def test_a_login_through_the_form_is_recorded(self) -> None:
        User.objects.create_user("carol", password="carol-pw-123")

        response = Client(REMOTE_ADDR="192.0.2.44").post(
            "/login/", {"username": "carol", "password": "carol-pw-123"}
        )

        self.assertEqual(response.status_code, 302)
        event = AuditEvent.objects.get(action="user.login")
        self.assertEqual((event.user.username, event.address), ("carol", "192.0.2.44"))

    def test_it_sends_anonymous_visitors_to_login(self) -> None:
        response = Client().get("/audit/")

        self.assertEqual(response.status_code, 302)
        self.assertTrue(response["Location"].startswith("/login/?next="))
