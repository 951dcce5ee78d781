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


class SchemaContentTestCase(TestCase):
    def setUp(self) -> None:
        response = self.client.get("/api/schema/", HTTP_ACCEPT="application/json")
        self.schema = response.json()

    def operation(self, path: str, method: str) -> dict:
        return self.schema["paths"][path][method]

    def test_it_documents_check_status(self) -> None:
        check = self.operation("/api/agents/{agent_id}/check_status/", "post")

        self.assertEqual(check["operationId"], "agents_check_status_create")
        self.assertIn("200", check["responses"])

    def test_actions_on_an_agent_document_their_own_input_and_answer(self) -> None:
        send = self.operation("/api/agents/{id}/send_command/", "post")
        request = send["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        self.assertTrue(request.endswith("/SendCommandInput"), request)
        self.assertIn("201", send["responses"])

        for action in ("upgrade", "stop", "start"):
            with self.subTest(action=action):
                self.assertIn(
                    "202", self.operation(f"/api/agents/{{id}}/{action}/", "post")["responses"]
                )
        self.assertIn("202", self.operation("/api/servers/{id}/install/", "post")["responses"])

    def test_histories_are_documented_as_the_plain_lists_they_are(self) -> None:
        for history in ("commands", "deployments"):
            with self.subTest(history=history):
                get = self.operation(f"/api/agents/{{id}}/{history}/", "get")
                answer = get["responses"]["200"]["content"]["application/json"]["schema"]
                self.assertEqual(answer["type"], "array")
                names = [p["name"] for p in get.get("parameters", [])]
                self.assertNotIn("page", names)
