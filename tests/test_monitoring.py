"""GET /metrics: who may scrape, and what a scrape shows (docs/metrics.md)."""

from ipaddress import ip_network
from typing import Any

from django.test import Client, override_settings
from prometheus_client.parser import text_string_to_metric_families

from tether.commands.models import Command
from tether.fleet.models import Agent

from .base import BaseTestCase

OUTSIDE = "203.0.113.5"


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class MetricsTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.scraper = Client()  # no login: a scraper is not a user

    def scrape(self, **extra: Any) -> dict:
        response = self.scraper.get("/metrics", **extra)
        self.assertEqual(response.status_code, 200, response.content)
        return parse(response.content.decode())

    def value(self, samples: dict, name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]


class AccessTestCase(MetricsTestCase):
    def test_it_works_from_the_loopback(self) -> None:
        response = self.scraper.get("/metrics")

        self.assertEqual(response.status_code, 200, response.content)
        self.assertTrue(response["Content-Type"].startswith("text/plain"))
        self.assertIn(b"# TYPE tether_agents gauge", response.content)

    def test_it_works_from_the_ipv6_loopback(self) -> None:
        response = self.scraper.get("/metrics", REMOTE_ADDR="::1")

        self.assertEqual(response.status_code, 200, response.content)

    def test_an_ipv4_peer_of_a_dual_stack_socket_is_read_as_ipv4(self) -> None:
        response = self.scraper.get("/metrics", REMOTE_ADDR="::ffff:127.0.0.1")

        self.assertEqual(response.status_code, 200, response.content)

    def test_it_refuses_a_peer_outside_the_allowed_networks(self) -> None:
        response = self.scraper.get("/metrics", REMOTE_ADDR=OUTSIDE)

        self.assertError(response, 403, "permission_denied")
        self.assertNotIn(b"tether_", response.content)

    def test_it_ignores_x_forwarded_for(self) -> None:
        response = self.scraper.get(
            "/metrics", REMOTE_ADDR=OUTSIDE, HTTP_X_FORWARDED_FOR="127.0.0.1"
        )

        self.assertError(response, 403, "permission_denied")

    def test_it_refuses_a_peer_address_that_is_not_one(self) -> None:
        response = self.scraper.get("/metrics", REMOTE_ADDR="")

        self.assertError(response, 403, "permission_denied")

    @override_settings(METRICS_ALLOW=(ip_network("10.0.0.0/8"), ip_network("fd00::/8")))
    def test_it_allows_the_configured_networks_only(self) -> None:
        for peer in ("10.1.2.3", "fd00::5"):
            self.assertEqual(self.scraper.get("/metrics", REMOTE_ADDR=peer).status_code, 200)

        self.assertError(self.scraper.get("/metrics"), 403, "permission_denied")

    @override_settings(METRICS_ALLOW=(), METRICS_TOKEN="scrape-secret")
    def test_it_allows_the_bearer_token_from_anywhere(self) -> None:
        response = self.scraper.get(
            "/metrics", REMOTE_ADDR=OUTSIDE, HTTP_AUTHORIZATION="Bearer scrape-secret"
        )

        self.assertEqual(response.status_code, 200, response.content)

    @override_settings(METRICS_ALLOW=(), METRICS_TOKEN="scrape-secret")
    def test_it_refuses_a_wrong_token(self) -> None:
        for header in ("Bearer scrape-secreT", "Bearer ", "Token scrape-secret", "scrape-secret"):
            with self.subTest(header=header):
                response = self.scraper.get(
                    "/metrics", REMOTE_ADDR=OUTSIDE, HTTP_AUTHORIZATION=header
                )
                self.assertError(response, 403, "permission_denied")

    @override_settings(METRICS_ALLOW=(), METRICS_TOKEN="")
    def test_with_no_token_configured_no_token_is_accepted(self) -> None:
        for header in ("Bearer ", "Bearer", "Bearer  "):
            with self.subTest(header=header):
                response = self.scraper.get(
                    "/metrics", REMOTE_ADDR=OUTSIDE, HTTP_AUTHORIZATION=header
                )
                self.assertError(response, 403, "permission_denied")

    def test_it_only_allows_get(self) -> None:
        response = self.scraper.post("/metrics")

        self.assertError(response, 405, "method_not_allowed")
        self.assertEqual(response["Allow"], "GET, HEAD")

    def test_a_refused_peer_learns_nothing_of_the_methods(self) -> None:
        response = self.scraper.post("/metrics", REMOTE_ADDR=OUTSIDE)

        self.assertError(response, 403, "permission_denied")

    def test_it_answers_openmetrics_when_asked(self) -> None:
        response = self.scraper.get("/metrics", HTTP_ACCEPT="application/openmetrics-text")

        self.assertEqual(response.status_code, 200, response.content)
        self.assertTrue(response["Content-Type"].startswith("application/openmetrics-text"))
        self.assertTrue(response.content.endswith(b"# EOF\n"))


class FleetFamiliesTestCase(MetricsTestCase):
    def test_agents_by_status_match_the_rows(self) -> None:
        Agent.objects.filter(pk=self.bob_agent.pk).update(status=Agent.Status.OFFLINE)

        samples = self.scrape()

        for status in Agent.Status.values:
            with self.subTest(status=status):
                self.assertEqual(
                    self.value(samples, "tether_agents", status=status),
                    Agent.objects.filter(status=status).count(),
                )
        self.assertEqual(self.value(samples, "tether_agents", status="offline"), 1)

    def test_commands_by_status_and_the_queue_depth(self) -> None:
        self.delivered("first")
        self.queue("second")
        self.queue("third")

        samples = self.scrape()

        self.assertEqual(self.value(samples, "tether_commands", status="queued"), 2)
        self.assertEqual(self.value(samples, "tether_commands", status="delivered"), 1)
        self.assertEqual(self.value(samples, "tether_queue_depth"), 2)
        for status in Command.Status.values:
            with self.subTest(status=status):
                self.assertIn(("tether_commands", (("status", status),)), samples)

    def test_the_scrape_reads_the_database_in_two_queries(self) -> None:
        with self.assertNumQueries(2):
            self.scrape()

    def test_the_instruments_are_there(self) -> None:
        samples = self.scrape()

        self.assertIn(("tether_held_polls", ()), samples)
        self.assertIn(("tether_dispatch_seconds_bucket", (("le", "0.001"),)), samples)
        self.assertIn(("tether_dispatch_seconds_bucket", (("le", "60.0"),)), samples)
        self.assertIn(("tether_dispatch_seconds_count", ()), samples)


class OutputBytesTestCase(MetricsTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.command = self.delivered("make-believe")

    def output_bytes(self, stream: str) -> float:
        samples = self.scrape()
        return samples.get(("tether_output_bytes_total", (("stream", stream),)), 0.0)

    def report(self, call: str, **body: Any) -> None:
        """A progress or result call, committed (the counter moves on commit)."""
        with self.captureOnCommitCallbacks(execute=True):
            response = getattr(self, call)(self.command.pk, **body)
        self.assertEqual(response.status_code, 200, response.content)

    def test_it_grows_with_a_progress_report(self) -> None:
        stdout, stderr = self.output_bytes("stdout"), self.output_bytes("stderr")

        self.report("progress", stdout="héllo", offset_stdout=0, stderr="e", offset_stderr=0)

        self.assertEqual(self.output_bytes("stdout"), stdout + 6)
        self.assertEqual(self.output_bytes("stderr"), stderr + 1)

    def test_a_resent_chunk_counts_once(self) -> None:
        self.report("progress", stdout="abc", offset_stdout=0)
        before = self.output_bytes("stdout")

        self.report("progress", stdout="abcdef", offset_stdout=0)

        self.assertEqual(self.output_bytes("stdout"), before + 3)

    def test_a_result_counts_its_own_bytes(self) -> None:
        before = self.output_bytes("stdout")

        self.report("result", status="succeeded", exit_code=0, stdout="done\n", offset_stdout=0)

        self.assertEqual(self.output_bytes("stdout"), before + 5)

    def test_a_legacy_whole_output_result_counts_only_what_is_new(self) -> None:
        before = self.output_bytes("stdout")
        self.report("progress", stdout="line 1\n", append=True)

        self.report("result", success=True, return_code=0, stdout="line 1\nline 2\n", append=False)

        self.assertEqual(self.output_bytes("stdout"), before + 14)

    def test_a_refused_report_counts_nothing(self) -> None:
        before = self.output_bytes("stderr")

        with self.captureOnCommitCallbacks(execute=True):
            response = self.result(
                self.command.pk,
                status="succeeded",
                exit_code=0,
                stderr="e",
                offset_stderr=0,
                stdout_size=10,
                append=True,
            )

        self.assertError(response, 409, "offset_gap")
        self.assertEqual(self.output_bytes("stderr"), before)


class RequestsTestCase(MetricsTestCase):
    def requests(self, route: str, method: str, code: int) -> float:
        samples = self.scrape()
        key = ("tether_requests_total", (("code", str(code)), ("method", method), ("route", route)))
        return samples.get(key, 0.0)

    def test_it_counts_by_url_pattern_not_by_path(self) -> None:
        route = "/api/agents/<pk>/"
        ok, missing = self.requests(route, "GET", 200), self.requests(route, "GET", 404)

        self.client.get(f"/api/agents/{self.agent.pk}/")
        self.client.get(f"/api/agents/{self.agent.pk}/")
        self.client.get(f"/api/agents/{self.bob_agent.pk}/")  # Bob's: a 404 for Alice

        self.assertEqual(self.requests(route, "GET", 200), ok + 2)
        self.assertEqual(self.requests(route, "GET", 404), missing + 1)
        text = self.scraper.get("/metrics").content.decode()
        self.assertNotIn(f'route="/api/agents/{self.agent.pk}/"', text)

    def test_unknown_paths_are_one_label(self) -> None:
        before = self.requests("unmatched", "GET", 404)

        self.client.get("/no/such/page-1")
        self.client.get("/no/such/page-2")

        self.assertEqual(self.requests("unmatched", "GET", 404), before + 2)
        self.assertNotIn(b"page-1", self.scraper.get("/metrics").content)

    def test_an_unusual_method_counts_as_other(self) -> None:
        before = self.requests("/api/agents/", "other", 405)

        self.client.generic("BREW", "/api/agents/")

        self.assertEqual(self.requests("/api/agents/", "other", 405), before + 1)

    def test_pages_are_counted_too(self) -> None:
        before = self.requests("/agents/<int:agent_id>/", "GET", 302)

        self.scraper.get(f"/agents/{self.agent.pk}/")  # anonymous: sent to the login form

        self.assertEqual(self.requests("/agents/<int:agent_id>/", "GET", 302), before + 1)
