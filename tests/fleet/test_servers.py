"""/api/servers/: create (token shown once), read, update, delete, rotate the token."""

from tether.accounts.models import AuditEvent
from tether.fleet import credentials
from tether.fleet.models import Agent, Server

from ..base import BaseTestCase

KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAA\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)


class CreateServerTestCase(BaseTestCase):
    def create(self, **fields):
        return self.post_json(
            "/api/servers/", {"name": "alice-db", "host": "db.example.org", **fields}
        )

    def test_it_works(self) -> None:
        response = self.create(tags=["db", "prod"], ssh_port=2222)

        self.assertEqual(response.status_code, 201, response.content)
        body = response.json()
        server = Server.objects.get(pk=body["id"])
        self.assertEqual(server.owner, self.alice)
        self.assertEqual(body["name"], "alice-db")
        self.assertEqual(body["ssh_port"], 2222)
        self.assertEqual(body["ssh_user"], "root")
        self.assertEqual(body["agent_dir"], "/opt/tether-agent")
        self.assertEqual(body["tags"], ["db", "prod"])
        self.assertEqual(body["agents"], [])

    def test_it_shows_the_server_token_once(self) -> None:
        body = self.create().json()

        token = body["server_token"]
        self.assertGreaterEqual(len(token), 22)  # >= 128 bits
        again = self.client.get(f"/api/servers/{body['id']}/").json()
        self.assertNotIn("server_token", again)
        listed = self.client.get("/api/servers/").json()["results"]
        self.assertTrue(all("server_token" not in s for s in listed))

    def test_it_stores_the_token_hashed(self) -> None:
        body = self.create().json()

        server = Server.objects.get(pk=body["id"])
        self.assertNotEqual(server.token_hash, body["server_token"])
        self.assertNotIn(body["server_token"], server.token_hash)
        self.assertEqual(server.token_hash, credentials.hash_token(body["server_token"]))

    def test_it_gives_each_server_its_own_token(self) -> None:
        first = self.create(name="a").json()["server_token"]
        second = self.create(name="b").json()["server_token"]

        self.assertNotEqual(first, second)

    def test_it_keeps_the_ssh_key_write_only_and_encrypted(self) -> None:
        body = self.create(ssh_private_key=KEY).json()

        self.assertNotIn("ssh_private_key", body)
        self.assertNotIn("ssh_private_key", self.client.get(f"/api/servers/{body['id']}/").json())
        stored = Server.objects.get(pk=body["id"]).ssh_private_key_encrypted
        self.assertNotIn("PRIVATE KEY", stored)
        self.assertEqual(credentials.decrypt(stored), KEY)

    def test_it_writes_an_audit_event(self) -> None:
        body = self.create().json()

        event = AuditEvent.objects.get(action="server.create", target_id=str(body["id"]))
        self.assertEqual(event.user, self.alice)
        self.assertNotIn(body["server_token"], str(event.details))

    def test_it_refuses_a_duplicate_name(self) -> None:
        error = self.assertError(self.create(name="alice-web"), 400, "invalid")

        self.assertIn("name", error["fields"])
        self.assertEqual(Server.objects.filter(owner=self.alice).count(), 1)

    def test_the_same_name_is_fine_for_another_owner(self) -> None:
        response = self.create(name="bob-db")

        self.assertEqual(response.status_code, 201, response.content)

    def test_it_refuses_an_unknown_field(self) -> None:
        error = self.assertError(self.create(owner=self.bob.pk), 400, "invalid")

        self.assertIn("owner", error["fields"])
        self.assertFalse(Server.objects.filter(name="alice-db").exists())

    def test_it_refuses_a_bad_host(self) -> None:
        # Options to ssh, Ansible host patterns, a port, shell words: none is a host.
        bad = ("-oProxyCommand=id", "a b", "", "web[01:03].example", "a,b", "*", "host:22")
        for host in (*bad, "x;id", "a..b", "{{ x }}"):
            with self.subTest(host=host):
                self.assertError(self.create(host=host), 400, "invalid")
        self.assertFalse(Server.objects.filter(name="alice-db").exists())

    def test_it_refuses_an_agent_dir_that_is_not_a_plain_absolute_path(self) -> None:
        bad = ("opt/agent", "/opt/a b", "/opt/{{ lookup('pipe','id') }}", "/opt/../etc")
        for agent_dir in (*bad, "//", "/opt//agent", "/opt/./agent", "/opt/.."):
            with self.subTest(agent_dir=agent_dir):
                self.assertError(self.create(agent_dir=agent_dir), 400, "invalid")
        self.assertFalse(Server.objects.filter(name="alice-db").exists())

    def test_it_takes_host_names_and_addresses(self) -> None:
        for host in ("web-1.example.org", "localhost", "10.0.0.7", "2001:db8::7", "db_1.lan"):
            with self.subTest(host=host):
                response = self.create(name=f"s-{host}", host=host)
                self.assertEqual(response.status_code, 201, response.content)

    def test_it_refuses_a_bad_ssh_user(self) -> None:
        for user in ("-oProxyCommand=id", "root admin", "{{ x }}", ""):
            with self.subTest(user=user):
                self.assertError(self.create(ssh_user=user), 400, "invalid")

    def test_it_refuses_a_bad_port(self) -> None:
        for port in (0, 65536, "ssh"):
            with self.subTest(port=port):
                self.assertError(self.create(ssh_port=port), 400, "invalid")

    def test_it_refuses_bad_tags(self) -> None:
        for tags in ("prod", ["has space"], [""], ["x" * 65]):
            with self.subTest(tags=tags):
                self.assertError(self.create(tags=tags), 400, "invalid")

    def test_it_requires_authentication(self) -> None:
        self.client.force_authenticate(None)

        self.assertError(self.create(), 401)
        self.assertFalse(Server.objects.filter(name="alice-db").exists())


class ServerDetailTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.url = f"/api/servers/{self.server.pk}/"
        self.bob_url = f"/api/servers/{self.bob_server.pk}/"

    def test_it_lists_only_own_servers(self) -> None:
        body = self.client.get("/api/servers/").json()

        self.assertEqual([s["id"] for s in body["results"]], [self.server.pk])

    def test_it_shows_the_agents(self) -> None:
        body = self.client.get(self.url).json()

        self.assertEqual(body["agents"], [self.agent.pk])

    def test_it_updates(self) -> None:
        response = self.patch_json(self.url, {"ssh_user": "deploy", "tags": ["web"]})

        self.assertEqual(response.status_code, 200, response.content)
        self.server.refresh_from_db()
        self.assertEqual(self.server.ssh_user, "deploy")
        self.assertEqual(self.server.tags, ["web"])
        self.assertTrue(AuditEvent.objects.filter(action="server.update").exists())
        body = response.json()
        self.assertEqual((body["ssh_user"], body["tags"]), ("deploy", ["web"]))
        self.assertEqual((self.server.name, self.server.host), ("alice-web", "10.0.0.1"))

    def test_it_audits_an_update_with_the_fields_it_changed(self) -> None:
        self.patch_json(self.url, {"ssh_user": "deploy", "tags": ["web"]})

        event = AuditEvent.objects.get(action="server.update")
        self.assertEqual((event.target_type, event.target_id), ("server", str(self.server.pk)))
        self.assertEqual(event.user, self.alice)
        self.assertEqual(event.details["fields"], ["ssh_user", "tags"])

    def test_it_audits_a_new_ssh_key_by_name_never_by_value(self) -> None:
        self.patch_json(self.url, {"ssh_private_key": KEY})

        event = AuditEvent.objects.get(action="server.update")
        self.assertEqual(event.details["fields"], ["ssh_private_key"])
        self.assertNotIn(KEY.strip()[40:80], str(event.details))

    def test_it_keeps_its_own_name_on_update(self) -> None:
        response = self.patch_json(self.url, {"name": "alice-web"})

        self.assertEqual(response.status_code, 200, response.content)

    def test_it_refuses_renaming_onto_another_server(self) -> None:
        self.post_json("/api/servers/", {"name": "other", "host": "h"})

        self.assertError(self.patch_json(self.url, {"name": "other"}), 400, "invalid")
        self.server.refresh_from_db()
        self.assertEqual(self.server.name, "alice-web")

    def test_it_encrypts_an_updated_ssh_key_and_can_clear_it(self) -> None:
        self.patch_json(self.url, {"ssh_private_key": KEY})
        self.server.refresh_from_db()
        self.assertEqual(credentials.decrypt(self.server.ssh_private_key_encrypted), KEY)

        self.patch_json(self.url, {"ssh_private_key": ""})
        self.server.refresh_from_db()
        self.assertEqual(self.server.ssh_private_key_encrypted, "")

    def test_it_refuses_an_unknown_field_on_update(self) -> None:
        self.assertError(self.patch_json(self.url, {"token_hash": "0" * 64}), 400, "invalid")

    def test_it_deletes(self) -> None:
        response = self.client.delete(self.url)

        self.assertEqual(response.status_code, 204)
        self.assertFalse(Server.objects.filter(pk=self.server.pk).exists())
        self.assertTrue(AuditEvent.objects.filter(action="server.delete").exists())
        self.assertFalse(Agent.objects.filter(pk=self.agent.pk).exists())
        self.assertTrue(Server.objects.filter(pk=self.bob_server.pk).exists())
        self.assertTrue(Agent.objects.filter(pk=self.bob_agent.pk).exists())
        self.assertError(self.client.get(self.url), 404, "not_found")

    def test_it_audits_a_delete(self) -> None:
        self.client.delete(self.url)

        event = AuditEvent.objects.get(action="server.delete")
        self.assertEqual((event.target_type, event.target_id), ("server", str(self.server.pk)))
        self.assertEqual(event.user, self.alice)
        self.assertEqual(event.details["name"], "alice-web")

    def test_it_validates_ownership_on_get(self) -> None:
        self.assertError(self.client.get(self.bob_url), 404, "not_found")

    def test_it_validates_ownership_on_patch(self) -> None:
        self.assertError(self.patch_json(self.bob_url, {"name": "mine"}), 404, "not_found")
        self.bob_server.refresh_from_db()
        self.assertEqual(self.bob_server.name, "bob-db")

    def test_it_validates_ownership_on_delete(self) -> None:
        self.assertError(self.client.delete(self.bob_url), 404, "not_found")
        self.assertTrue(Server.objects.filter(pk=self.bob_server.pk).exists())

    def test_it_handles_missing_server(self) -> None:
        self.assertError(self.client.get("/api/servers/999999/"), 404, "not_found")

    def test_staff_sees_every_server(self) -> None:
        self.alice.is_staff = True
        self.alice.save()

        self.assertEqual(self.client.get(self.bob_url).status_code, 200)


class RotateTokenTestCase(BaseTestCase):
    def register(self, server_token: str):
        return self.post_json(
            "/api/agents/register/", {"server_token": server_token, "hostname": "web-2"}
        )

    def test_it_gives_a_new_token_and_retires_the_old_one(self) -> None:
        response = self.client.post(f"/api/servers/{self.server.pk}/rotate_token/")

        self.assertEqual(response.status_code, 200, response.content)
        new_token = response.json()["server_token"]
        self.assertNotEqual(new_token, self.server_token)
        self.assertError(self.register(self.server_token), 401)
        self.assertEqual(self.register(new_token).status_code, 201)

    def test_it_keeps_registered_agents(self) -> None:
        self.client.post(f"/api/servers/{self.server.pk}/rotate_token/")

        response = self.agent_client.post("/api/agents/heartbeat/", {}, format="json")
        self.assertEqual(response.status_code, 200, response.content)

    def test_it_writes_an_audit_event(self) -> None:
        self.client.post(f"/api/servers/{self.server.pk}/rotate_token/")

        self.assertTrue(AuditEvent.objects.filter(action="server.rotate_token").exists())

    def test_it_validates_ownership(self) -> None:
        response = self.client.post(f"/api/servers/{self.bob_server.pk}/rotate_token/")

        self.assertError(response, 404, "not_found")
        self.assertEqual(self.register(self.bob_server_token).status_code, 201)
