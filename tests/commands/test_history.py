"""GET /api/agents/{id}/commands/: the agent's latest commands, newest first."""

from datetime import timedelta

from django.utils import timezone

from tether.commands.models import Command

from ..base import BaseTestCase


class HistoryTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.url = f"/api/agents/{self.agent.pk}/commands/"

    def test_it_works(self) -> None:
        first = self.queue("first")
        second = self.queue("second")

        response = self.client.get(self.url)

        self.assertEqual(response.status_code, 200)
        body = response.json()
        self.assertEqual([c["id"] for c in body], [second.pk, first.pk])
        self.assertEqual(body[0]["command"], "second")
        self.assertEqual(body[0]["created_by"], "alice")
        # A history row carries no output.
        self.assertNotIn("stdout", body[0])

    def test_it_lists_at_most_fifty_newest_first(self) -> None:
        start = timezone.now() - timedelta(hours=1)
        Command.objects.bulk_create(
            Command(
                agent=self.agent,
                command=f"cmd {i}",
                timeout=10,
                created_at=start + timedelta(seconds=i),
            )
            for i in range(55)
        )

        body = self.client.get(self.url).json()

        self.assertEqual(len(body), 50)
        self.assertEqual(body[0]["command"], "cmd 54")
        self.assertEqual(body[-1]["command"], "cmd 5")
        times = [c["created_at"] for c in body]
        self.assertEqual(times, sorted(times, reverse=True))

    def test_it_lists_only_this_agents_commands(self) -> None:
        self.queue("bob's", agent=self.bob_agent)

        self.assertEqual(self.client.get(self.url).json(), [])

    def test_it_validates_ownership(self) -> None:
        self.queue(agent=self.bob_agent)

        self.assertError(self.client.get(f"/api/agents/{self.bob_agent.pk}/commands/"), 404)
