"""The pages at 10,000 agents: the fleet page and the fragment it polls, the run form's agent
picker, the servers page, and a run of 1,000 targets, each a page at a time from a fixed
number of queries (a query per row fails the budget); a poll of an unchanged fleet page is
answered without rendering."""

import re

from django.test import Client
from django.utils import timezone

from tether.commands.models import Command, Run
from tether.fleet.models import Agent

from ..base import BaseTestCase
from ..scale import FLEET_SIZE, QueryBudgetMixin, bulk_fleet

# Every page: the session and the user (login_required), then its own queries.
FLEET_QUERIES = 2 + 2  # the counters (which count the filtered rows too), a page of rows
PICKER_QUERIES = 2 + 2  # a page of agents offered, how many more match
SERVERS_QUERIES = 2 + 3  # the count, a page of servers, their agents
# The history (its count, its page, their counts), the counters, the picker (2), the templates.
RUNS_QUERIES = 2 + 7
RUN_QUERIES = 2 + 4  # the run, the grid's count and page, the run's counts
RUN_TARGETS = 1_000


class PagesAtScaleTestCase(QueryBudgetMixin, BaseTestCase):
    # One class: the 10,000 rows are written once for all its tests.

    @classmethod
    def setUpTestData(cls) -> None:
        super().setUpTestData()
        cls.fleet = bulk_fleet(cls.alice)
        cls.alices = FLEET_SIZE + 1  # and web-1, from BaseTestCase
        cls.big_run = Run.objects.create(
            created_by=cls.alice,
            command="uptime",
            timeout=60,
            max_concurrency=RUN_TARGETS,
            targets_total=RUN_TARGETS,
        )
        statuses = [Command.Status.SUCCEEDED, Command.Status.FAILED, Command.Status.RUNNING]
        Command.objects.bulk_create(
            Command(
                agent=agent,
                run=cls.big_run,
                command="uptime",
                timeout=60,
                status=statuses[n % 3],
                created_by=cls.alice,
                started_at=timezone.now(),
            )
            for n, agent in enumerate(cls.fleet[:RUN_TARGETS])
        )

    def setUp(self) -> None:
        super().setUp()
        self.client = Client()
        self.client.force_login(self.alice)

    def get(self, url: str, budget: int, status: int = 200) -> str:
        with self.assertMaxQueries(budget):
            response = self.client.get(url)
        self.assertEqual(response.status_code, status)
        return response.content.decode()

    # The fleet page and its fragment ---------------------------------------------------------
    def test_the_page_shows_one_page_and_counts_the_whole_fleet(self) -> None:
        body = self.get("/", FLEET_QUERIES)

        self.assertEqual(body.count("data-agent="), 100)
        self.assertIn(f'id="count-total">{self.alices}<', body)
        self.assertIn(f'id="count-offline">{FLEET_SIZE // 10}<', body)
        self.assertIn("page 1 of 101", body)
        self.assertIn("node-srv-0000", body)

    def test_the_fragment_shows_one_page(self) -> None:
        body = self.get("/fleet/rows/?page=3", FLEET_QUERIES)

        self.assertEqual(body.count("data-agent="), 100)
        self.assertIn("node-00200", body)
        self.assertIn("page 3 of 101", body)

    def test_a_status_filter(self) -> None:
        body = self.get("/fleet/rows/?status=offline&page=2", FLEET_QUERIES)

        self.assertEqual(body.count("data-agent="), 100)
        self.assertEqual(body.count("status-offline"), 100)
        self.assertIn("page 2 of 10", body)

    def test_a_tag_filter(self) -> None:
        body = self.get("/?tag=rack-7", FLEET_QUERIES)

        self.assertIn(f'id="count-matching">{FLEET_SIZE // 50}<', body)
        self.assertIn("node-00007", body)
        self.assertNotIn("node-00017", body)
        self.assertIn("page 1 of 2", body)

    def test_a_search(self) -> None:
        body = self.get("/fleet/rows/?q=node-0012", FLEET_QUERIES)

        self.assertEqual(body.count("data-agent="), 10)

    def test_an_unchanged_fragment_is_answered_without_rendering(self) -> None:
        url = "/fleet/rows/?status=online&tag=even&page=2"
        seen = re.search(r'name="seen" value="(\w+)"', self.get(url, FLEET_QUERIES)).group(1)

        with self.assertTemplateNotUsed("web/_fleet_rows.html"):
            body = self.get(f"{url}&seen={seen}", FLEET_QUERIES, status=204)

        self.assertEqual(body, "")

    def test_a_changed_fragment_is_rendered_again(self) -> None:
        url = "/fleet/rows/?page=2"
        seen = re.search(r'name="seen" value="(\w+)"', self.get(url, FLEET_QUERIES)).group(1)
        Agent.objects.filter(hostname="node-00150").update(status="stopped")

        body = self.get(f"{url}&seen={seen}", FLEET_QUERIES)

        self.assertIn("status-stopped", body)

    # The other lists ------------------------------------------------------------------------
    def test_the_run_forms_picker(self) -> None:
        body = self.get("/runs/agents/?tag=rack-7", PICKER_QUERIES)

        self.assertEqual(body.count('name="agents"'), 50)
        self.assertIn("150 more match", body)

    def test_the_runs_page(self) -> None:
        body = self.get("/runs/", RUNS_QUERIES)

        self.assertIn(f"All my agents ({self.alices})", body)
        self.assertEqual(body.count('name="agents"'), 50)

    def test_the_servers_page(self) -> None:
        body = self.get("/servers/?page=2", SERVERS_QUERIES)

        self.assertIn("node-srv-0049", body)  # alice-web is first: page 2 starts at 0049
        self.assertIn("node-00499", body)
        self.assertNotIn("node-srv-0100", body)
        self.assertIn("page 2 of 21", body)

    def test_the_page_of_a_run_of_a_thousand_targets(self) -> None:
        body = self.get(f"/runs/{self.big_run.pk}/?page=4", RUN_QUERIES)

        self.assertEqual(body.count("data-command="), 100)
        self.assertIn("node-00300", body)
        self.assertIn("page 4 of 10", body)
        self.assertIn('data-count="total">1000<', body)

    def test_the_page_of_a_run_by_status(self) -> None:
        body = self.get(f"/runs/{self.big_run.pk}/?status=failed&page=2", RUN_QUERIES)

        self.assertEqual(body.count('data-status="failed"'), 100)
