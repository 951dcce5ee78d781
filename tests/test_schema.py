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
        self.assertTrue(request.endswith("/SendCommandInputRequest"), request)
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


class SchemaErrorsTestCase(TestCase):
    """What a client generator or a fuzzer reads: every refusal the server can answer with is
    declared with the one error body of DESIGN §7."""

    @classmethod
    def setUpTestData(cls) -> None:
        cls.schema = cls.client_class().get("/api/schema/", HTTP_ACCEPT="application/json").json()

    def operation(self, path: str, method: str) -> dict:
        return self.schema["paths"][path][method]

    def error_codes(self, path: str, method: str) -> set[str]:
        responses = self.operation(path, method)["responses"]
        return {code for code in responses if code[0] == "4"}

    def test_every_error_answer_is_the_error_body(self) -> None:
        error = {"$ref": "#/components/schemas/Error"}
        for path, operations in self.schema["paths"].items():
            for method, operation in operations.items():
                for code, answer in operation["responses"].items():
                    if code[0] == "4":
                        with self.subTest(path=path, method=method, code=code):
                            schema = answer["content"]["application/json"]["schema"]
                            self.assertEqual(schema, error)
        detail = self.schema["components"]["schemas"]["ErrorDetail"]
        self.assertEqual(set(detail["required"]), {"code", "message"})

    def test_each_operation_declares_the_refusals_it_can_give(self) -> None:
        expected = {
            ("/api/agents/{id}/send_command/", "post"): {"400", "401", "403", "404", "409", "413"},
            ("/api/agents/", "get"): {"400", "401", "403", "404"},
            ("/api/commands/{id}/", "get"): {"401", "403", "404"},
            ("/api/runs/", "post"): {"400", "401", "403", "404", "413"},  # targets by id
            ("/api/auth/token/", "post"): {"400", "413", "429"},
            ("/api/agents/register/", "post"): {"400", "401", "413", "429"},
            ("/api/agents/command/{command_id}/result/", "post"): {
                "400",
                "401",
                "404",
                "409",
                "413",
                "429",
            },
            ("/api/agents/poll_commands/", "get"): {"400", "401", "429"},
            ("/api/agents/files/{filename}/", "get"): {"404", "429"},
        }
        for (path, method), codes in expected.items():
            with self.subTest(path=path, method=method):
                self.assertEqual(self.error_codes(path, method), codes)

    def test_bodies_that_refuse_unknown_fields_say_so(self) -> None:
        components = self.schema["components"]["schemas"]
        for strict in (
            "ServerRequest",
            "SendCommandInputRequest",
            "RunInputRequest",
            "NoInputRequest",
        ):
            with self.subTest(component=strict):
                self.assertIs(components[strict]["additionalProperties"], False)
        # What agents send is read leniently: agents of other versions add fields.
        self.assertNotIn("additionalProperties", components["ProgressInputRequest"])

    def test_the_streams_are_documented_as_server_sent_events(self) -> None:
        for path in (
            "/api/commands/{command_id}/stream/",
            "/api/runs/{run_id}/stream/",
            "/api/deployments/{deployment_id}/stream/",
        ):
            with self.subTest(path=path):
                get = self.operation(path, "get")
                self.assertIn("text/event-stream", get["responses"]["200"]["content"])
                self.assertIn("404", get["responses"])

    def test_the_agent_api_is_documented_with_its_headers(self) -> None:
        for path, method in (
            ("/api/agents/poll_commands/", "get"),
            ("/api/agents/command/{command_id}/progress/", "post"),
            ("/api/agents/heartbeat/", "post"),
        ):
            with self.subTest(path=path):
                operation = self.operation(path, method)
                self.assertEqual(operation["security"], [{"agentToken": []}])
                headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
                self.assertEqual(
                    headers, {"X-Tether-Timestamp", "X-Tether-Nonce", "X-Tether-Signature"}
                )
        poll = self.operation("/api/agents/poll_commands/", "get")
        self.assertIn("wait", {p["name"] for p in poll["parameters"]})
        self.assertTrue(self.operation("/api/agents/command/", "post")["deprecated"])
        self.assertNotIn("deprecated", poll)
