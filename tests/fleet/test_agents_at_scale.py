"""GET /api/agents/ at 10,000 agents: a page at a time, filtered in the database, in a fixed
number of queries (a query per row fails the budget)."""

from tether.fleet.models import Agent

from ..base import BaseTestCase
from ..scale import FLEET_SIZE, QueryBudgetMixin, bulk_fleet

# The page's count and the page itself (the client is force-authenticated: no token lookup).
LIST_QUERIES = 2
PAGE_SIZE = 100  # REST_FRAMEWORK["PAGE_SIZE"]


class AgentsListAtScaleTestCase(QueryBudgetMixin, BaseTestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        super().setUpTestData()
        bulk_fleet(cls.alice)
        cls.alices = FLEET_SIZE + 1  # and web-1, from BaseTestCase

    def page(self, query: str = "") -> dict:
        with self.assertMaxQueries(LIST_QUERIES):
            response = self.client.get(f"/api/agents/{query}")
        self.assertEqual(response.status_code, 200, response.content)
        return response.json()

    def test_the_first_page_is_one_page(self) -> None:
        body = self.page()

        self.assertEqual(body["count"], self.alices)
        self.assertEqual(len(body["results"]), PAGE_SIZE)
        hostnames = [agent["hostname"] for agent in body["results"]]
        self.assertEqual(hostnames, [f"node-{n:05d}" for n in range(PAGE_SIZE)])
        first = body["results"][0]
        self.assertEqual(first["server_name"], "node-srv-0000")
        self.assertEqual(first["tags"], ["even", "rack-0"])
        self.assertIs(first["legacy"], False)
        self.assertIs(body["results"][1]["legacy"], True)

    def test_a_page_deep_in_the_list(self) -> None:
        body = self.page("?page=100")

        self.assertEqual(body["results"][0]["hostname"], f"node-{99 * PAGE_SIZE:05d}")

    def test_a_status_filter(self) -> None:
        body = self.page("?status=offline")

        self.assertEqual(body["count"], FLEET_SIZE // 10)
        self.assertEqual({agent["status"] for agent in body["results"]}, {"offline"})

    def test_a_tag_filter(self) -> None:
        body = self.page("?tag=rack-7")

        # rack-7 exactly: not rack-17, rack-27...
        self.assertEqual(body["count"], FLEET_SIZE // 50)
        self.assertTrue(all("rack-7" in agent["tags"] for agent in body["results"]))
        self.assertEqual(body["results"][0]["hostname"], "node-00007")

    def test_a_tag_filter_with_a_status(self) -> None:
        body = self.page("?tag=odd&status=offline")

        # Offline agents are those with n % 10 == 8: all even.
        self.assertEqual(body["count"], 0)
        self.assertEqual(self.page("?tag=even&status=offline")["count"], FLEET_SIZE // 10)

    def test_a_search(self) -> None:
        body = self.page("?search=node-0012")

        self.assertEqual(
            [a["hostname"] for a in body["results"]], [f"node-0012{n}" for n in range(10)]
        )

    def test_a_search_of_server_names(self) -> None:
        body = self.page("?search=srv-0999")

        self.assertEqual(
            [a["hostname"] for a in body["results"]], [f"node-0999{n}" for n in range(10)]
        )

    def test_bobs_agents_stay_his(self) -> None:
        Agent.objects.filter(pk=self.bob_agent.pk).update(tags=["rack-7"])

        ids = [agent["id"] for agent in self.page("?tag=rack-7&page=2")["results"]]

        self.assertNotIn(self.bob_agent.pk, ids)
