"""GET /api/agents/ (own agents, filters), GET/PATCH /api/agents/{id}/."""

from urllib.parse import quote

from tether.fleet import services
from tether.fleet.models import Agent

from ..base import BaseTestCase


class AgentsListTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.db_server, _ = services.create_server(owner=self.alice, name="alice-db", host="h")
        self.db_agent = services.register_agent(server=self.db_server, hostname="db-7").agent
        Agent.objects.filter(pk=self.agent.pk).update(status="online", tags=["web", "prod"])
        Agent.objects.filter(pk=self.db_agent.pk).update(status="offline", tags=["db", "prod"])

    def ids(self, query: str = "") -> list[int]:
        response = self.client.get(f"/api/agents/{query}")
        self.assertEqual(response.status_code, 200, response.content)
        return [a["id"] for a in response.json()["results"]]

    def test_it_works(self) -> None:
        body = self.client.get("/api/agents/").json()

        self.assertEqual(body["count"], 2)
        web = next(a for a in body["results"] if a["id"] == self.agent.pk)
        self.assertEqual(web["server"], self.server.pk)
        self.assertEqual(web["server_name"], "alice-web")
        self.assertEqual(web["hostname"], "web-1")
        self.assertEqual(web["status"], "online")
        self.assertEqual(web["tags"], ["web", "prod"])
        self.assertIs(web["legacy"], True)
        self.assertNotIn("token_hash", web)
        self.assertNotIn("secret_key_encrypted", web)

    def test_it_lists_only_own_agents(self) -> None:
        self.assertNotIn(self.bob_agent.pk, self.ids())
        self.assertEqual(sorted(self.ids()), sorted([self.agent.pk, self.db_agent.pk]))

    def test_staff_sees_all(self) -> None:
        self.alice.is_staff = True
        self.alice.save()

        self.assertIn(self.bob_agent.pk, self.ids())

    def test_it_filters_by_status(self) -> None:
        self.assertEqual(self.ids("?status=online"), [self.agent.pk])
        self.assertEqual(self.ids("?status=offline"), [self.db_agent.pk])
        self.assertEqual(self.ids("?status=pending"), [])

    def test_it_refuses_an_unknown_status(self) -> None:
        error = self.assertError(self.client.get("/api/agents/?status=sleeping"), 400, "invalid")

        self.assertIn("status", error["message"])

    def test_it_filters_by_tag(self) -> None:
        self.assertEqual(self.ids("?tag=web"), [self.agent.pk])
        self.assertEqual(sorted(self.ids("?tag=prod")), sorted([self.agent.pk, self.db_agent.pk]))
        self.assertEqual(self.ids("?tag=pro"), [])
        self.assertEqual(self.ids("?tag=prod&status=offline"), [self.db_agent.pk])

    def test_a_tag_is_matched_as_a_whole_string(self) -> None:
        for tag in ('"web"', '["web"]', "web%", "w_b", "%", "web' OR '1'='1"):
            with self.subTest(tag=tag):
                self.assertEqual(self.ids(f"?tag={quote(tag)}"), [])

    def test_it_handles_a_page_out_of_range(self) -> None:
        for page in ("2", "abc", "0"):
            with self.subTest(page=page):
                self.assertError(self.client.get(f"/api/agents/?page={page}"), 404, "not_found")

    def test_the_tag_filter_keeps_ownership(self) -> None:
        Agent.objects.filter(pk=self.bob_agent.pk).update(tags=["web"])

        self.assertEqual(self.ids("?tag=web"), [self.agent.pk])

    def test_it_searches_hostname_and_server_name(self) -> None:
        self.assertEqual(self.ids("?search=WEB-1"), [self.agent.pk])
        self.assertEqual(self.ids("?search=alice-db"), [self.db_agent.pk])
        self.assertEqual(self.ids("?search=bob"), [])

    def test_it_filters_by_server(self) -> None:
        self.assertEqual(self.ids(f"?server={self.db_server.pk}"), [self.db_agent.pk])
        self.assertEqual(self.ids(f"?server={self.bob_server.pk}"), [])  # not Alice's
        for bad in ("web", "-1", "9" * 40):
            with self.subTest(server=bad):
                self.assertError(self.client.get(f"/api/agents/?server={bad}"), 400, "invalid")

    def test_it_combines_filters(self) -> None:
        self.assertEqual(self.ids("?search=alice&status=offline"), [self.db_agent.pk])
        self.assertEqual(self.ids("?search=web&status=offline"), [])


class AgentDetailTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.url = f"/api/agents/{self.agent.pk}/"

    def test_it_works(self) -> None:
        body = self.client.get(self.url).json()

        self.assertEqual(body["id"], self.agent.pk)
        self.assertEqual(body["version"], "1.0.0")

    def test_it_updates_tags(self) -> None:
        response = self.patch_json(self.url, {"tags": ["web", "eu-west:1"]})

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response.json()["tags"], ["web", "eu-west:1"])
        self.agent.refresh_from_db()
        self.assertEqual(self.agent.tags, ["web", "eu-west:1"])

    def test_it_refuses_bad_tags(self) -> None:
        for tags in ("web", ["a b"], [{"a": 1}], ["x"] * 51):
            with self.subTest(tags=tags):
                self.assertError(self.patch_json(self.url, {"tags": tags}), 400, "invalid")
        self.agent.refresh_from_db()
        self.assertEqual(self.agent.tags, [])

    def test_it_refuses_read_only_fields(self) -> None:
        for fields in ({"status": "online"}, {"hostname": "evil"}, {"server": self.bob_server.pk}):
            with self.subTest(fields=fields):
                self.assertError(self.patch_json(self.url, fields), 400, "invalid")
        self.agent.refresh_from_db()
        self.assertEqual((self.agent.status, self.agent.hostname), ("pending", "web-1"))

    def test_it_validates_ownership(self) -> None:
        bob_url = f"/api/agents/{self.bob_agent.pk}/"

        self.assertError(self.client.get(bob_url), 404, "not_found")
        self.assertError(self.patch_json(bob_url, {"tags": ["mine"]}), 404, "not_found")
        self.bob_agent.refresh_from_db()
        self.assertEqual(self.bob_agent.tags, [])

    def test_it_cannot_be_deleted_through_the_api(self) -> None:
        self.assertError(self.client.delete(self.url), 405)
        self.assertTrue(Agent.objects.filter(pk=self.agent.pk).exists())

    def test_it_handles_missing_agent(self) -> None:
        self.assertError(self.client.get("/api/agents/999999/"), 404)
