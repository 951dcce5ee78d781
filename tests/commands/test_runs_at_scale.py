"""GET /api/runs/{id}/ with 1,000 targets and GET /api/runs/ with many runs: a fixed number of
queries, however many targets and runs (a query per target or per run fails the budget)."""

from tether.commands.models import Command, Run

from ..base import BaseTestCase
from ..scale import QueryBudgetMixin, bulk_fleet

TARGETS = 1_000
RUNS = 30
# The client is force-authenticated: no token lookup.
RUN_QUERIES = 3  # the run, its counts, its targets with their agents
LIST_QUERIES = 3  # the count, a page of runs, the counts of all of them


class RunsAtScaleTestCase(QueryBudgetMixin, BaseTestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        super().setUpTestData()
        fleet = bulk_fleet(cls.alice, size=TARGETS)
        runs = Run.objects.bulk_create(
            Run(created_by=cls.alice, command=f"echo {n}", timeout=60, max_concurrency=TARGETS)
            for n in range(RUNS)
        )
        cls.big_run = runs[0]
        statuses = [Command.Status.SUCCEEDED, Command.Status.FAILED, Command.Status.QUEUED]
        Command.objects.bulk_create(
            [
                Command(agent=agent, run=cls.big_run, command="echo 0", timeout=60, status=status)
                for agent, status in zip(fleet, statuses * TARGETS, strict=False)
            ]
            + [
                Command(agent=fleet[n], run=run, command="x", timeout=60)
                for n, run in enumerate(runs[1:])
            ]
        )

    def test_a_run_of_a_thousand_targets(self) -> None:
        with self.assertMaxQueries(RUN_QUERIES):
            response = self.client.get(f"/api/runs/{self.big_run.pk}/")

        self.assertEqual(response.status_code, 200)
        body = response.json()
        self.assertEqual(len(body["targets"]), TARGETS)
        self.assertEqual(body["targets"][0]["hostname"], "node-00000")
        self.assertEqual(body["counts"]["total"], TARGETS)
        self.assertEqual(body["counts"]["failed"], TARGETS // 3)

    def test_the_list_counts_each_run_in_one_query(self) -> None:
        with self.assertMaxQueries(LIST_QUERIES):
            response = self.client.get("/api/runs/")

        self.assertEqual(response.status_code, 200)
        listed = {run["id"]: run["counts"] for run in response.json()["results"]}
        self.assertEqual(len(listed), RUNS)
        self.assertEqual(listed[self.big_run.pk]["total"], TARGETS)
        self.assertEqual(listed[self.big_run.pk]["succeeded"], 334)
        self.assertEqual(sum(counts["total"] for counts in listed.values()), TARGETS + RUNS - 1)
