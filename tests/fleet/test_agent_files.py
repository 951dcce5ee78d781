"""GET /api/agents/files/{name}/: the agent's own files, by exact name, and nothing else."""

import tempfile
from pathlib import Path

from django.test import override_settings
from rest_framework.test import APIClient

from ..base import BaseTestCase


class AgentFilesTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.agent_dir = Path(tmp.name)
        (self.agent_dir / "main.py").write_text("print('agent')\n")
        (self.agent_dir / "settings.py").write_text("SECRET = 1\n")
        overrides = override_settings(AGENT_DIR=self.agent_dir)
        overrides.enable()
        self.addCleanup(overrides.disable)

    def get(self, name: str):
        return APIClient().get(f"/api/agents/files/{name}/")

    def test_it_serves_the_agent_without_a_token(self) -> None:
        response = self.get("main.py")

        self.assertEqual(response.status_code, 200)
        self.assertEqual(b"".join(response.streaming_content), b"print('agent')\n")

    def test_it_serves_requirements_when_present(self) -> None:
        (self.agent_dir / "requirements.txt").write_text("\n")

        response = self.get("requirements.txt")

        self.assertEqual(response.status_code, 200)

    def test_it_answers_404_for_a_listed_file_that_is_absent(self) -> None:
        self.assertError(self.get("requirements.txt"), 404, "not_found")

    def test_it_serves_no_other_file(self) -> None:
        for name in ("settings.py", "main.pyc", ".env", "..", "MAIN.PY", "%2E%2E%2Fmain.py"):
            with self.subTest(name=name):
                self.assertError(self.get(name), 404, "not_found")

    def test_it_only_allows_get(self) -> None:
        self.assertError(APIClient().post("/api/agents/files/main.py/"), 405)
