"""`POST /api/agents/check_status/`: input and ownership (the calls themselves: e2e)."""

from tether.fleet.models import Agent

from ..base import BaseTestCase

URL = "/api/agents/check_status/"


class FleetCheckTestCase(BaseTestCase):
    def test_an_agent_without_an_rpc_endpoint_is_reported_unreachable_with_the_reason(
        self,
    ) -> None:
        response = self.post_json(URL, {"targets": {"all": True}})

        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        self.assertEqual(body["counts"], {"total": 1, "reachable": 0, "unreachable": 1})
        (row,) = body["results"]
        self.assertEqual((row["agent"], row["hostname"]), (self.agent.pk, "web-1"))
        self.assertIn("no RPC endpoint", row["error"])

    def test_it_refuses_bad_targets(self) -> None:
        for body in (
            {},
            {"targets": {}},
            {"targets": {"tags": ["nope"]}},
            {"targets": 3},
            {"targets": {"all": True}, "extra": 1},
        ):
            with self.subTest(body=body):
                self.assertError(self.post_json(URL, body), 400)

    def test_another_users_agent_is_not_found(self) -> None:
        body = {"targets": {"agents": [self.agent.pk, self.bob_agent.pk]}}

        self.assertError(self.post_json(URL, body), 404)

    def test_it_needs_a_login_and_a_post(self) -> None:
        from rest_framework.test import APIClient

        self.assertError(APIClient().post(URL, {"targets": {"all": True}}, format="json"), 401)
        self.assertError(self.client.get(URL), 405)
        self.assertEqual(Agent.objects.get(pk=self.agent.pk).status, Agent.Status.PENDING)
