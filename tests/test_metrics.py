"""tether.metrics: bounded labels, and one scrape for several server processes."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from django.test import SimpleTestCase
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tether import metrics

# A server process: holds a poll, receives output, answers a request, and exits.
WORKER = """
import os, sys
from tether import metrics
assert metrics.MULTIPROCESS
metrics.HELD_POLLS.inc()
metrics.OUTPUT_BYTES.labels(stream="stdout").inc(int(sys.argv[1]))
metrics.DISPATCH_SECONDS.observe(0.004)
metrics.observe_request("api/agents/<int:pk>/", "GET", 200)
print(os.getpid())
"""

# Another process of the same server, scraped: what it shows after the others told it which
# processes are gone.
SCRAPE = """
import sys
from prometheus_client import generate_latest
from tether import metrics
for pid in sys.argv[1:]:
    metrics.process_exited(int(pid))
sys.stdout.write(generate_latest(metrics.process_metrics()).decode())
"""


class LabelsTestCase(SimpleTestCase):
    def count(self, route: str, method: str, code: str) -> float:
        labels = {"route": route, "method": method, "code": code}
        return REGISTRY.get_sample_value("tether_requests_total", labels) or 0.0

    def test_a_route_is_its_url_pattern(self) -> None:
        cases = {
            "api/agents/poll_commands/": "/api/agents/poll_commands/",
            "api/commands/<int:command_id>/stream/": "/api/commands/<int:command_id>/stream/",
            r"api/agents/(?P<pk>\d+)/send_command/$": "/api/agents/<pk>/send_command/",
            r"api/^agents/(?P<pk>[^/.]+)/$": "/api/agents/<pk>/",
            "": "/",
            "/already/": "/already/",
            None: "unmatched",
        }
        for pattern, label in cases.items():
            with self.subTest(pattern=pattern):
                self.assertEqual(metrics.route_label(pattern), label)

    def test_observe_request_counts_once_per_call(self) -> None:
        before = self.count("/api/agents/poll_commands/", "GET", "200")

        metrics.observe_request("api/agents/poll_commands/", "get", 200)

        self.assertEqual(self.count("/api/agents/poll_commands/", "GET", "200"), before + 1)

    def test_unusual_methods_share_one_label(self) -> None:
        before = self.count("unmatched", "other", "405")

        metrics.observe_request(None, "BREW", 405)
        metrics.observe_request(None, "X" * 50, 405)

        self.assertEqual(self.count("unmatched", "other", "405"), before + 2)


class MultiprocessTestCase(SimpleTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.enterContext(tempfile.TemporaryDirectory(prefix="prom-")))
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.dir)}

    def run_worker(self, output_bytes: int) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", WORKER, str(output_bytes)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return int(proc.stdout)

    def scrape(self, *exited: int) -> dict[tuple[str, tuple], float]:
        proc = subprocess.run(
            [sys.executable, "-c", SCRAPE, *map(str, exited)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(proc.stdout)
            for sample in family.samples
        }

    def test_one_scrape_sums_every_process(self) -> None:
        self.run_worker(5)
        self.run_worker(7)

        samples = self.scrape()

        self.assertEqual(samples[("tether_output_bytes_total", (("stream", "stdout"),))], 12)
        self.assertEqual(samples[("tether_held_polls", ())], 2)
        self.assertEqual(samples[("tether_dispatch_seconds_count", ())], 2)
        self.assertEqual(samples[("tether_dispatch_seconds_bucket", (("le", "0.005"),))], 2)
        route = (("code", "200"), ("method", "GET"), ("route", "/api/agents/<int:pk>/"))
        self.assertEqual(samples[("tether_requests_total", route)], 2)

    def test_a_process_that_exited_holds_no_polls(self) -> None:
        first = self.run_worker(5)
        self.run_worker(7)

        samples = self.scrape(first)

        self.assertEqual(samples[("tether_held_polls", ())], 1)
        # What it counted stays counted.
        self.assertEqual(samples[("tether_output_bytes_total", (("stream", "stdout"),))], 12)
