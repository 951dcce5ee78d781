"""The "Run on many" pages, in process: the form creates a run as the API would (same
validation, same messages, nothing queued when refused), the history and the grid show only
the user's own runs, a page at a time, and cancel goes through the runs service. The browser
test (tests/web/test_browser.py) drives the live grid."""

from typing import Any
from unittest import mock

from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils.html import escape

from tether.commands import runs
from tether.commands.command_templates import validate_parameters
from tether.commands.models import Command, CommandTemplate, Run
from tether.commands.output import Chunk
from tether.commands.reports import Result
from tether.commands.selectors import target_counts
from tether.commands.services import record_result
from tether.fleet import services as fleet_services
from tether.fleet.models import Agent

from ..base import BaseTestCase

S = Command.Status
XSS = "<img src=x onerror=alert(1)>"


class RunsPageTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.api = self.client_for(self.alice)
        self.client = Client()
        self.client.force_login(self.alice)
        self.agents = [self.agent]
        for n in (2, 3):
            self.agents.append(
                fleet_services.register_agent(server=self.server, hostname=f"web-{n}").agent
            )
        for agent in [*self.agents, self.bob_agent]:
            fleet_services.record_heartbeat(agent=agent)
        Agent.objects.filter(pk__in=[a.pk for a in self.agents[1:]]).update(tags=["web"])

    def post_form(self, **fields: Any) -> Any:
        fields.setdefault("command", "uptime")
        return self.client.post("/runs/", {k: v for k, v in fields.items() if v is not None})

    def start(self, user: Any = None, agents: list[Agent] | None = None, **kw: Any) -> Run:
        kw.setdefault("command", "uptime")
        request = runs.RunRequest(agents=agents or self.agents, args=None, timeout=60, **kw)
        return runs.create_run(user=user or self.alice, request=request)[0]

    def nothing_queued(self) -> None:
        self.assertFalse(Run.objects.exists())
        self.assertFalse(Command.objects.exists())


class RunFormTestCase(RunsPageTestCase):
    def test_the_navigation_leads_to_the_form(self) -> None:
        response = self.client.get("/")
        self.assertContains(response, '<a href="/runs/">Runs</a>', html=True)

        page = self.client.get("/runs/")

        self.assertContains(page, "Run on many")
        self.assertContains(page, 'name="command"')
        self.assertContains(page, 'name="max_concurrency"')
        self.assertContains(page, "csrfmiddlewaretoken")
        self.assertIn("no-store", page["Cache-Control"])  # the back button gets a fresh key

    def test_it_creates_a_run_for_the_checked_agents(self) -> None:
        chosen = self.agents[1:]

        response = self.post_form(
            command="uname -a",
            agents=[a.pk for a in chosen],
            timeout="30",
            max_concurrency="1",
            max_errors="0",
            offline="wait",
        )

        run = Run.objects.get()
        self.assertRedirects(response, f"/runs/{run.pk}/", fetch_redirect_response=False)
        self.assertEqual(
            (run.command, run.created_by, run.timeout, run.max_concurrency, run.max_errors),
            ("uname -a", self.alice, 30, 1, 0),
        )
        self.assertEqual(run.offline, Run.Offline.WAIT)
        targets = run.commands.order_by("agent__hostname")
        self.assertEqual([c.agent for c in targets], chosen)
        self.assertEqual([c.status for c in targets], [S.QUEUED, S.HELD])  # a window of one

    def test_targets_are_the_union_of_checked_tagged_online_and_all(self) -> None:
        Agent.objects.filter(pk=self.agents[2].pk).update(status=Agent.Status.OFFLINE)
        cases = [
            ({"tags": "web"}, {"web-2", "web-3"}),
            ({"tags": "web", "agents": [self.agent.pk]}, {"web-1", "web-2", "web-3"}),
            ({"agent_status": "online"}, {"web-1", "web-2"}),
            ({"agent_status": "offline"}, {"web-3"}),
            ({"all": "on"}, {"web-1", "web-2", "web-3"}),
        ]
        for fields, hostnames in cases:
            with self.subTest(fields=fields):
                self.assertEqual(self.post_form(**fields).status_code, 302)
                run = Run.objects.order_by("-id").first()
                self.assertEqual(
                    set(run.commands.values_list("agent__hostname", flat=True)), hostnames
                )

    def test_a_percentage_is_the_apis(self) -> None:
        self.post_form(all="on", max_concurrency="50%", max_errors="34%")

        run = Run.objects.get()
        self.assertEqual((run.max_concurrency, run.max_errors), (2, 1))  # of 3: up, down

    def test_a_template_value_is_quoted(self) -> None:
        template = CommandTemplate.objects.create(
            owner=self.alice,
            name="restart",
            command="systemctl restart {unit}",
            parameters=validate_parameters(
                "systemctl restart {unit}", [{"name": "unit", "type": "string"}]
            ),
        )

        self.post_form(command=None, template=template.pk, param_unit="a; reboot", all="on")

        run = Run.objects.get()
        self.assertEqual((run.command, run.template), ("systemctl restart 'a; reboot'", template))
        self.assertEqual(run.commands.count(), 3)

    def test_bad_input_shows_the_apis_message_and_queues_nothing(self) -> None:
        # (the form's fields, the same request as the API's JSON body)
        cases = [
            ({"all": "on", "max_concurrency": "0"}, {"max_concurrency": 0}),
            ({"all": "on", "max_concurrency": "150%"}, {"max_concurrency": "150%"}),
            ({"all": "on", "max_concurrency": "five"}, {"max_concurrency": "five"}),
            ({"all": "on", "max_errors": "-1"}, {"max_errors": -1}),
            ({"all": "on", "timeout": "0"}, {"timeout": 0}),
            ({"all": "on", "offline": "maybe"}, {"offline": "maybe"}),
            ({"all": "on", "command": "  "}, {"command": "  "}),
            ({"all": "on", "command": None}, {"command": None}),
            ({"tags": "nope"}, {"targets": {"tags": ["nope"]}}),
            ({}, {"targets": {}}),
        ]
        for fields, api_body in cases:
            with self.subTest(fields=fields):
                body = {"command": "uptime", "targets": {"all": True}, **api_body}
                api = self.api.post("/api/runs/", _without_none(body), format="json")
                self.assertEqual(api.status_code, 400, api.content)
                message = api.json()["error"]["message"]

                response = self.post_form(**fields)

                self.assertContains(response, escape(message), status_code=400)
                self.nothing_queued()

    def test_a_status_no_agent_has_is_refused(self) -> None:
        response = self.post_form(agent_status="stopped")

        self.assertContains(response, "targets: No agent of yours is stopped.", status_code=400)
        self.nothing_queued()

    def test_a_refused_form_keeps_what_was_typed(self) -> None:
        response = self.post_form(
            command="df -h", agents=[self.agents[2].pk], max_concurrency="0", tags="web"
        )

        self.assertContains(response, 'value="df -h"', status_code=400)
        self.assertContains(response, 'value="web"', status_code=400)
        checkbox = f'name="agents" value="{self.agents[2].pk}" aria-label="web-3 on alice-web"'
        self.assertContains(response, checkbox + " checked", status_code=400)

    def test_another_users_agent_or_template_is_not_found(self) -> None:
        bob_template = CommandTemplate.objects.create(owner=self.bob, name="t", command="id")
        for fields in (
            {"agents": [self.agent.pk, self.bob_agent.pk]},
            {"command": None, "template": bob_template.pk, "all": "on"},
        ):
            with self.subTest(fields=fields):
                response = self.post_form(**fields)

                self.assertEqual(response.status_code, 404)
                self.assertNotContains(response, "db-1", status_code=404)
                self.nothing_queued()

    def test_a_double_submit_is_one_run(self) -> None:
        first = self.post_form(all="on", idempotency_key="form-key-1")
        again = self.post_form(all="on", idempotency_key="form-key-1")

        self.assertEqual(first["Location"], again["Location"])
        self.assertEqual(Run.objects.count(), 1)
        self.assertEqual(Command.objects.count(), 3)

    def test_it_offers_the_parameters_of_the_users_own_template(self) -> None:
        own = CommandTemplate.objects.create(
            owner=self.alice,
            name="restart",
            command="systemctl restart {unit}",
            parameters=validate_parameters(
                "systemctl restart {unit}", [{"name": "unit", "type": "string"}]
            ),
        )
        bobs = CommandTemplate.objects.create(
            owner=self.bob, name="b", command="echo {x}", parameters=own.parameters
        )

        response = self.client.get(f"/runs/template-params/?template={own.pk}")

        self.assertContains(response, 'name="param_unit"')
        refused = self.post_form(command=None, template=own.pk, param_unit="nginx", tags="nope")
        self.assertContains(refused, 'value="nginx"', status_code=400)
        other = self.client.get(f"/runs/template-params/?template={bobs.pk}")
        self.assertNotContains(other, "param_")

    def test_it_sends_anonymous_visitors_to_login(self) -> None:
        run = self.start()
        for url in ("/runs/", f"/runs/{run.pk}/", "/runs/agents/", "/runs/template-params/"):
            response = Client().get(url)
            self.assertEqual(response.status_code, 302, url)
            self.assertTrue(response["Location"].startswith("/login/?next="), url)
        self.assertEqual(Client().post("/runs/", {"command": "id", "all": "on"}).status_code, 302)
        self.assertEqual(Run.objects.count(), 1)

    def test_it_requires_csrf(self) -> None:
        client = Client(enforce_csrf_checks=True)
        client.force_login(self.alice)

        response = client.post("/runs/", {"command": "id", "all": "on"})

        self.assertEqual(response.status_code, 403)
        self.nothing_queued()


class PickerTestCase(RunsPageTestCase):
    def test_it_offers_a_capped_list_and_says_how_many_more_match(self) -> None:
        with mock.patch("tether.web.run_views.PICKER_ROWS", 2):
            response = self.client.get("/runs/agents/?q=web")

        self.assertContains(response, 'name="agents"', count=2)
        self.assertContains(response, "1 more match")

    def test_checked_agents_stay_whatever_the_filter(self) -> None:
        checked = self.agents[2]

        response = self.client.get(f"/runs/agents/?q=nomatch&agents={checked.pk}")

        self.assertContains(response, f'value="{checked.pk}"')
        self.assertContains(response, " checked", count=1)
        self.assertNotContains(response, f'value="{self.agent.pk}"')

    def test_it_filters_like_the_fleet_page_and_shows_only_own_agents(self) -> None:
        Agent.objects.filter(pk=self.bob_agent.pk).update(tags=["web"])

        response = self.client.get(f"/runs/agents/?tag=web&agents={self.bob_agent.pk}")

        self.assertContains(response, 'name="agents"', count=2)
        self.assertNotContains(response, "db-1")
        offline = self.client.get("/runs/agents/?status=offline")
        self.assertContains(offline, "No agent matches.")

    def test_the_page_never_lists_the_whole_fleet(self) -> None:
        with mock.patch("tether.web.run_views.PICKER_ROWS", 1):
            response = self.client.get("/runs/")

        self.assertContains(response, 'name="agents"', count=1)
        self.assertContains(response, "2 more match")


class HistoryTestCase(RunsPageTestCase):
    def test_it_lists_only_own_runs_newest_first_with_their_counts(self) -> None:
        older = self.start(command="echo older")
        newer = self.start(command="echo newer", agents=self.agents[:2])
        bobs = self.start(user=self.bob, agents=[self.bob_agent], command="echo bobs")
        first = newer.commands.order_by("id").first()
        with self.captureOnCommitCallbacks(execute=True):
            record_result(
                agent=first.agent, command_id=first.pk, result=Result(status="failed", exit_code=1)
            )

        response = self.client.get("/runs/")

        body = response.content.decode()
        self.assertLess(body.index(f'data-run="{newer.pk}"'), body.index(f'data-run="{older.pk}"'))
        self.assertNotContains(response, f'data-run="{bobs.pk}"')
        self.assertNotContains(response, "echo bobs")
        self.assertContains(response, "2 targets: 1 failed, 1 queued")
        self.assertContains(response, "3 targets: 3 queued")

    def test_its_counts_are_the_runs_own(self) -> None:
        run = self.start(agents=self.agents)
        target = run.commands.order_by("id").first()
        with self.captureOnCommitCallbacks(execute=True):
            record_result(
                agent=target.agent, command_id=target.pk, result=Result(status="succeeded")
            )
        self.start(user=self.bob, agents=[self.bob_agent])
        run.refresh_from_db()

        self.assertEqual(target_counts([run.pk])[run.pk], runs.run_counts(run))

    def test_it_is_paged_and_its_queries_do_not_grow_with_it(self) -> None:
        self.start()
        with CaptureQueriesContext(connection) as one_run:
            self.client.get("/runs/")
        for _ in range(3):
            self.start()

        with (
            CaptureQueriesContext(connection) as four_runs,
            mock.patch("tether.web.run_views.RUNS_PAGE", 3),
        ):
            first = self.client.get("/runs/")
            second = self.client.get("/runs/?page=2")

        self.assertEqual(len(four_runs) // 2, len(one_run))
        self.assertContains(first, "page 1 of 2")
        self.assertContains(first, "data-run=", count=3)
        self.assertContains(second, "data-run=", count=1)


class RunPageTestCase(RunsPageTestCase):
    def test_it_shows_one_row_per_target_with_the_counts_and_its_stream(self) -> None:
        run = self.start(max_concurrency=1)

        response = self.client.get(f"/runs/{run.pk}/")

        self.assertContains(response, f'data-stream="/api/runs/{run.pk}/stream/"')
        self.assertContains(response, 'data-count="total">3<')
        self.assertContains(response, 'data-count="queued">3<')
        for target in run.commands.all():
            self.assertContains(response, f'<tr data-command="{target.pk}"')
        self.assertContains(response, 'data-status="held"', count=2)

    def test_a_finished_run_opens_no_stream_and_offers_no_cancel(self) -> None:
        run = self.start(agents=[self.agent])
        target = run.commands.get()
        with self.captureOnCommitCallbacks(execute=True):
            record_result(
                agent=self.agent,
                command_id=target.pk,
                result=Result(status="succeeded", exit_code=0, chunks=[Chunk("stdout", b"hi", 0)]),
            )

        response = self.client.get(f"/runs/{run.pk}/")

        self.assertContains(response, "data-final")
        self.assertRegex(response.content.decode(), r'<form [^>]*data-cancel [^>]*" hidden>')
        self.assertContains(response, 'data-field="exit">0<')

    def test_the_grid_is_paged_and_filtered_by_status(self) -> None:
        run = self.start(max_concurrency=1)

        with mock.patch("tether.web.run_views.GRID_PAGE", 2):
            first = self.client.get(f"/runs/{run.pk}/")
            held = self.client.get(f"/runs/{run.pk}/?status=held")

        self.assertContains(first, "<tr data-command=", count=2)
        self.assertContains(first, "page 1 of 2")
        self.assertContains(held, 'data-status="held"', count=2)
        self.assertNotContains(held, 'data-status="queued"')

    def test_it_escapes_the_command_and_the_hostnames(self) -> None:
        Agent.objects.filter(pk=self.agent.pk).update(hostname=XSS)
        run = self.start(command=f"echo '{XSS}'")

        for url in (f"/runs/{run.pk}/", "/runs/"):
            response = self.client.get(url)
            self.assertNotContains(response, XSS)
            self.assertContains(response, escape(XSS))

    def test_a_targets_console_shows_its_output_as_text(self) -> None:
        run = self.start(agents=[self.agent])
        target = run.commands.get()
        record_result(
            agent=self.agent,
            command_id=target.pk,
            result=Result(
                status="succeeded", exit_code=0, chunks=[Chunk("stdout", XSS.encode(), 0)]
            ),
        )

        response = self.client.get(f"/commands/{target.pk}/console/")

        self.assertContains(response, "data-final")
        self.assertNotContains(response, XSS)
        self.assertContains(response, escape(XSS))

    def test_another_users_run_or_console_is_not_found(self) -> None:
        bobs = self.start(user=self.bob, agents=[self.bob_agent], command="echo bobs")
        bob_target = bobs.commands.get()

        for url in (f"/runs/{bobs.pk}/", f"/commands/{bob_target.pk}/console/"):
            response = self.client.get(url)
            self.assertEqual(response.status_code, 404, url)
            self.assertNotContains(response, "echo bobs", status_code=404)
        self.assertEqual(self.client.post(f"/runs/{bobs.pk}/cancel/").status_code, 404)
        bobs.refresh_from_db()
        self.assertEqual(bobs.status, Run.Status.RUNNING)


class CancelTestCase(RunsPageTestCase):
    def test_it_cancels_the_run(self) -> None:
        run = self.start(max_concurrency=1)

        response = self.client.post(f"/runs/{run.pk}/cancel/", follow=True)

        self.assertRedirects(response, f"/runs/{run.pk}/")
        self.assertContains(response, f"Run #{run.pk} is being cancelled.")
        run.refresh_from_db()
        self.assertEqual(run.status, Run.Status.CANCELLED)
        self.assertIn("cancelled by alice", run.reason)
        self.assertEqual(set(run.commands.values_list("status", flat=True)), {S.CANCELLED})

    def test_a_finished_run_says_so(self) -> None:
        run = self.start()
        self.client.post(f"/runs/{run.pk}/cancel/")

        response = self.client.post(f"/runs/{run.pk}/cancel/", follow=True)

        self.assertContains(response, "run is already cancelled")

    def test_it_only_allows_post(self) -> None:
        run = self.start()

        self.assertEqual(self.client.get(f"/runs/{run.pk}/cancel/").status_code, 405)
        run.refresh_from_db()
        self.assertEqual(run.status, Run.Status.RUNNING)


def _without_none(body: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in body.items() if value is not None}
