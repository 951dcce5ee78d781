"""POST /api/agents/deployment/{id}/progress/: the agent appends to its own deployment's log."""

from django.test import override_settings
from rest_framework.test import APIClient

from tether.deploy import services
from tether.deploy.models import Deployment
from tether.fleet import services as fleet_services

from ..base import BaseTestCase


class DeploymentProgressTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deployment = services.create_deployment(
            server=self.server, agent=self.agent, kind="upgrade", method="agent", user=self.alice
        )

    def progress(self, log: str, deployment_id: int | None = None, client=None):
        url = f"/api/agents/deployment/{deployment_id or self.deployment.pk}/progress/"
        return self.agent_post(url, {"log": log}, client)

    def test_it_appends_lines_and_starts_the_deployment(self) -> None:
        self.progress("fetching main.py")
        response = self.progress("self-test passed\n")

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response.json(), {"status": "ok", "deployment_status": "running"})
        self.deployment.refresh_from_db()
        self.assertEqual(self.deployment.log, "fetching main.py\nself-test passed\n")
        self.assertEqual(self.deployment.status, "running")
        self.assertIsNotNone(self.deployment.started_at)

    def test_the_older_path_works_too(self) -> None:
        url = f"/api/agents/deployments/{self.deployment.pk}/progress/"
        response = self.agent_post(url, {"log": "hello"})

        self.assertEqual(response.status_code, 200, response.content)
        self.deployment.refresh_from_db()
        self.assertEqual(self.deployment.log, "hello\n")

    def test_another_agent_cannot_write_it(self) -> None:
        other = fleet_services.register_agent(server=self.server, hostname="web-2")
        client = APIClient()
        client.credentials(HTTP_X_AGENT_TOKEN=other.token)

        response = self.progress("forged", client=client)

        self.assertError(response, 404, "not_found")
        self.deployment.refresh_from_db()
        self.assertEqual(self.deployment.log, "")

    def test_it_requires_an_agent_token(self) -> None:
        response = self.progress("anonymous", client=APIClient())

        self.assertError(response, 401)
        self.deployment.refresh_from_db()
        self.assertEqual(self.deployment.log, "")

    def test_it_handles_missing_deployment(self) -> None:
        self.assertError(self.progress("x", deployment_id=999999), 404, "not_found")

    def test_it_validates_the_body(self) -> None:
        response = self.agent_post(
            f"/api/agents/deployment/{self.deployment.pk}/progress/", {"log": 42}
        )

        self.assertError(response, 400, "invalid")

    @override_settings(MAX_DEPLOYMENT_LOG_BYTES=100)
    def test_it_caps_the_log(self) -> None:
        for i in range(20):
            self.progress(f"line {i:02d} of a chatty deployment")

        self.deployment.refresh_from_db()
        self.assertTrue(self.deployment.log_truncated)
        self.assertLessEqual(len(self.deployment.log.encode()), 100 + len(services.TRUNCATION_MARK))
        self.assertTrue(self.deployment.log.endswith(services.TRUNCATION_MARK))

    def test_a_finished_deployment_takes_no_more_log(self) -> None:
        services.finish_deployment(deployment=self.deployment, status="failed", line="boom")

        response = self.progress("late line")

        self.assertEqual(response.json()["deployment_status"], "failed")
        self.deployment.refresh_from_db()
        self.assertEqual(self.deployment.log, "boom\n")
        self.assertEqual(Deployment.objects.get(pk=self.deployment.pk).status, "failed")
