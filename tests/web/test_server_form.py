"""The web form and the API refuse the same bad server fields, with the same message: both
check them through the model's validators (tether.fleet.validators)."""

from django.test import Client

from tether.accounts.models import AuditEvent
from tether.fleet.models import Server

from ..base import BaseTestCase

GOOD = {"name": "new-host", "host": "10.0.0.9", "ssh_user": "root", "ssh_port": 22}
HOSTILE = [
    ("host", "-oProxyCommand=touch /tmp/x"),
    ("host", "web 1"),
    ("ssh_user", "a b;c"),
    ("ssh_user", "root;touch /tmp/x"),
    ("ssh_user", "-oProxyCommand=id"),
    ("ssh_port", 0),
    ("ssh_port", 65536),
    ("name", "alice-web"),  # taken: Alice already has a server of this name
]


class ServerFormTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.browser = Client()
        self.browser.force_login(self.alice)

    def api_message(self, field: str, value: object) -> str:
        response = self.post_json("/api/servers/", {**GOOD, field: value})
        self.assertEqual(response.status_code, 400, response.content)
        return response.json()["error"]["fields"][field][0]

    def form_message(self, field: str, value: object) -> str:
        response = self.browser.post("/servers/", {**GOOD, field: value})
        self.assertEqual(response.status_code, 200)  # the form again, with its errors
        errors = response.context["form"].errors
        self.assertEqual(list(errors), [field])
        return errors[field][0]

    def test_the_page_refuses_what_the_api_refuses_with_the_same_message(self) -> None:
        audited = AuditEvent.objects.count()
        for field, value in HOSTILE:
            with self.subTest(field=field, value=value):
                self.assertEqual(self.form_message(field, value), self.api_message(field, value))
        self.assertFalse(Server.objects.filter(name="new-host").exists())
        self.assertEqual(AuditEvent.objects.count(), audited)

    def test_the_page_shows_the_reason_next_to_the_field(self) -> None:
        response = self.browser.post("/servers/", {**GOOD, "host": "-oProxyCommand=touch /tmp/x"})

        self.assertContains(response, "Enter a host name or address.")
        self.assertNotContains(response, "server_token")

    def test_a_good_server_is_created_from_either_door(self) -> None:
        response = self.browser.post("/servers/", GOOD)
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "--server-token")
        self.assertEqual(Server.objects.get(name="new-host").owner, self.alice)

        response = self.post_json("/api/servers/", {**GOOD, "name": "newer-host"})
        self.assertEqual(response.status_code, 201, response.content)
