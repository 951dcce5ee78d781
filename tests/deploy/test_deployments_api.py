"""GET /api/deployments/{id}/, the per-agent list, cancel, and the live log stream."""

from collections.abc import AsyncIterator

from asgiref.sync import async_to_sync

from tether.accounts.models import AuditEvent
from tether.deploy import services

from ..base import BaseTestCase


async def collect(stream: AsyncIterator[bytes]) -> str:
    return b"".join([chunk async for chunk in stream]).decode()


class DeploymentsApiTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deployment = services.create_deployment(
            server=self.server,
            agent=self.agent,
            kind="upgrade",
            method="agent",
            user=self.alice,
            target_version="0.2.0",
        )
        self.bobs = services.create_deployment(
            server=self.bob_server, agent=self.bob_agent, kind="stop", method="ssh", user=self.bob
        )

    def test_it_reads_a_deployment(self) -> None:
        services.append_log(deployment_id=self.deployment.pk, text="step 1")

        response = self.client.get(f"/api/deployments/{self.deployment.pk}/")

        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        self.assertEqual(
            {k: body[k] for k in ("agent", "server", "kind", "method", "status", "target_version")},
            {
                "agent": self.agent.pk,
                "server": self.server.pk,
                "kind": "upgrade",
                "method": "agent",
                "status": "running",
                "target_version": "0.2.0",
            },
        )
        self.assertEqual(body["log"], "step 1\n")
        self.assertEqual(body["created_by"], "alice")

    def test_it_lists_an_agents_deployments_newest_first(self) -> None:
        services.finish_deployment(deployment=self.deployment, status="succeeded")
        newer = services.create_deployment(
            server=self.server, agent=self.agent, kind="stop", method="agent", user=self.alice
        )

        response = self.client.get(f"/api/agents/{self.agent.pk}/deployments/")

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual([d["id"] for d in response.json()], [newer.pk, self.deployment.pk])
        self.assertNotIn("log", response.json()[0])

    def test_it_cancels_a_running_deployment(self) -> None:
        response = self.client.post(f"/api/deployments/{self.deployment.pk}/cancel/")

        self.assertEqual(response.status_code, 202, response.content)
        self.assertEqual(response.json()["status"], "cancelled")
        self.assertIn("cancelled by alice", response.json()["log"])
        self.assertTrue(AuditEvent.objects.filter(action="deployment.cancel").exists())

    def test_cancelling_a_finished_deployment_is_a_conflict(self) -> None:
        services.finish_deployment(deployment=self.deployment, status="succeeded")

        response = self.client.post(f"/api/deployments/{self.deployment.pk}/cancel/")

        self.assertError(response, 409, "already_final")

    def test_it_validates_ownership(self) -> None:
        for method, url in (
            ("get", f"/api/deployments/{self.bobs.pk}/"),
            ("post", f"/api/deployments/{self.bobs.pk}/cancel/"),
            ("get", f"/api/deployments/{self.bobs.pk}/stream/"),
            ("get", f"/api/agents/{self.bob_agent.pk}/deployments/"),
        ):
            with self.subTest(url=url):
                self.assertError(getattr(self.client, method)(url), 404)
        self.bobs.refresh_from_db()
        self.assertEqual(self.bobs.status, "queued")

    def test_the_list_holds_only_own_deployments(self) -> None:
        response = self.client.get("/api/deployments/")

        self.assertEqual([d["id"] for d in response.json()["results"]], [self.deployment.pk])

    def test_it_streams_the_log_then_the_final_status(self) -> None:
        services.append_log(deployment_id=self.deployment.pk, text="TASK [copy agent]")
        services.finish_deployment(deployment=self.deployment, status="succeeded", line="done")

        response = self.client.get(f"/api/deployments/{self.deployment.pk}/stream/")

        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["Content-Type"], "text/event-stream")
        text = async_to_sync(collect)(response.streaming_content)
        self.assertIn('"data": "TASK [copy agent]\\ndone\\n"', text)
        self.assertTrue(
            text.rstrip().endswith(f'data: {{"id": {self.deployment.pk}, "status": "succeeded"}}')
        )
