"""The thin route's shortcut for command reports gives what the URLconf gives."""

from django.test import SimpleTestCase
from django.urls import resolve

from tether.asgi import agent_endpoint_match


class AgentRoutesTestCase(SimpleTestCase):
    def test_report_paths_match_the_urlconf(self) -> None:
        for prefix in ("command", "commands"):
            for kind in ("progress", "result"):
                path = f"/api/agents/{prefix}/1234/{kind}/"
                with self.subTest(path=path):
                    fast, django = agent_endpoint_match(path), resolve(path)
                    self.assertIs(fast.func, django.func)
                    self.assertEqual((fast.args, fast.kwargs), (tuple(django.args), django.kwargs))
                    self.assertEqual(fast.route, django.route)

    def test_other_agent_paths_go_through_the_urlconf(self) -> None:
        match = agent_endpoint_match("/api/agents/heartbeat/")
        self.assertIs(match.func, resolve("/api/agents/heartbeat/").func)
        self.assertIsNone(agent_endpoint_match("/api/agents/command/12/nothing/"))
        self.assertIsNone(agent_endpoint_match("/api/commands/12/"))

    def test_an_absurd_id_is_not_taken_by_the_shortcut(self) -> None:
        path = f"/api/agents/command/{'9' * 40}/result/"
        match = agent_endpoint_match(path)
        self.assertEqual(match.kwargs, resolve(path).kwargs)
