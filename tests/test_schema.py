from django.test import TestCase


class SchemaTestCase(TestCase):
    def test_it_serves_the_openapi_schema(self) -> None:
        response = self.client.get("/api/schema/", HTTP_ACCEPT="application/json")
        self.assertEqual(response.status_code, 200)
        body = response.content.decode()
        self.assertIn("openapi", body)
        self.assertIn("/api/agents/{id}/send_command/", body)
        self.assertIn("agentToken", body)


class HealthzTestCase(TestCase):
    def test_it_answers_ok_when_the_database_answers(self) -> None:
        response = self.client.get("/healthz")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.json(), {"status": "ok"})
