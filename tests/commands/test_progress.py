"""POST /api/agents/command/{id}/progress/: acknowledge, then stream output by offset."""

import base64
import time
from datetime import UTC, datetime, timedelta

from django.utils import timezone

from tether import metrics
from tether.commands.models import Command
from tether.commands.output import dropped_marker

from ..base import BaseTestCase


def seconds_ago(seconds: float) -> datetime:
    return timezone.now() - timedelta(seconds=seconds)


class ProgressTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.command = self.delivered("make-believe")

    def test_it_works(self) -> None:
        response = self.progress(self.command.pk, stdout="hi\n", offset_stdout=0)

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(
            response.json(),
            {"status": "ok", "offsets": {"stdout": 3, "stderr": 0}, "cancel": False},
        )
        read = self.read(self.command.pk)
        self.assertEqual(read["status"], "running")
        self.assertEqual(read["stdout"], "hi\n")

    def test_an_empty_progress_acknowledges_the_command(self) -> None:
        Command.objects.filter(pk=self.command.pk).update(delivered_at=seconds_ago(10))
        started = time.time() - 3

        self.progress(self.command.pk, started_at=started)

        self.command.refresh_from_db()
        self.assertEqual(self.command.status, "running")
        self.assertEqual(self.command.started_at, datetime.fromtimestamp(started, tz=UTC))

    def test_it_ignores_an_implausible_start_time(self) -> None:
        self.progress(self.command.pk, started_at=0)

        self.command.refresh_from_db()
        self.assertGreater(self.command.started_at.year, 1970)

    def test_it_keeps_a_start_time_from_a_skewed_clock_between_delivery_and_now(self) -> None:
        # An agent whose clock is 400 s behind (it signs with ours): a start before the
        # delivery would put its report deadline in the past and the running command lost.
        self.progress(self.command.pk, started_at=time.time() - 400)
        self.command.refresh_from_db()
        self.assertEqual(self.command.started_at, self.command.delivered_at)

        ahead = self.delivered("ahead")
        self.progress(ahead.pk, started_at=time.time() + 120)
        ahead.refresh_from_db()
        self.assertLessEqual(ahead.started_at, timezone.now())

    def test_it_is_served_on_the_plural_path_too(self) -> None:
        response = self.agent_post(f"/api/agents/commands/{self.command.pk}/progress/", {})

        self.assertEqual(response.status_code, 200, response.content)

    def test_a_resent_chunk_is_stored_once(self) -> None:
        for _ in range(2):
            response = self.progress(self.command.pk, stdout="once", offset_stdout=0)
            self.assertEqual(response.json()["offsets"]["stdout"], 4)

        self.assertEqual(self.read(self.command.pk)["stdout"], "once")

    def test_it_answers_a_gap_with_the_expected_offsets(self) -> None:
        self.progress(self.command.pk, stdout="abc", offset_stdout=0)

        response = self.progress(
            self.command.pk, stdout="ghi", offset_stdout=6, stderr="e", offset_stderr=0
        )

        error = self.assertError(response, 409, "offset_gap")
        self.assertEqual(error["expected"], {"stdout": 3, "stderr": 0})
        self.assertEqual(self.read(self.command.pk)["stderr"], "")

    def test_a_hole_the_agent_declares_dropped_is_recorded_not_asked_for(self) -> None:
        self.progress(self.command.pk, stdout="head\n", offset_stdout=0)

        response = self.progress(
            self.command.pk, stdout="tail\n", offset_stdout=9, dropped_stdout=4
        )

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response.json()["offsets"]["stdout"], 14)
        read = self.read(self.command.pk)
        self.assertEqual(read["stdout"], "head\n" + dropped_marker(4) + "tail\n")
        self.assertEqual((read["stdout_dropped"], read["truncated"]), (4, True))

    def test_a_declared_hole_is_not_output_received(self) -> None:
        received = metrics.OUTPUT_BYTES.labels(stream="stdout")
        before = received._value.get()

        with self.captureOnCommitCallbacks(execute=True):
            self.progress(self.command.pk, stdout="head\n", offset_stdout=0)
            self.progress(
                self.command.pk, stdout="tail\n", offset_stdout=2**40, dropped_stdout=2**40
            )

        self.assertEqual(received._value.get() - before, 10)  # tether_output_bytes_total

    def test_the_largest_hole_an_agent_may_declare_is_stored_as_counts(self) -> None:
        response = self.progress(
            self.command.pk, stdout="end\n", offset_stdout=2**62, dropped_stdout=2**62
        )

        self.assertEqual(response.status_code, 200, response.content)
        read = self.read(self.command.pk)
        self.assertEqual(read["stdout"], dropped_marker(2**62) + "end\n")
        self.assertEqual(read["stdout_dropped"], 2**62)
        self.assertEqual(self.command.chunks.count(), 1)

    def test_a_declared_hole_that_does_not_reach_the_stored_end_is_a_gap(self) -> None:
        self.progress(self.command.pk, stdout="abc", offset_stdout=0)

        response = self.progress(self.command.pk, stdout="xyz", offset_stdout=9, dropped_stdout=2)

        error = self.assertError(response, 409, "offset_gap")
        self.assertEqual(error["expected"], {"stdout": 3, "stderr": 0})
        self.assertEqual(self.read(self.command.pk)["stdout_dropped"], 0)

    def test_it_measures_offsets_in_bytes(self) -> None:
        self.progress(self.command.pk, stdout="é", offset_stdout=0)

        response = self.progress(self.command.pk, stdout="!", offset_stdout=2)

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(self.read(self.command.pk)["stdout"], "é!")

    def test_it_keeps_whitespace_and_nul_characters(self) -> None:
        self.progress(self.command.pk, stdout="  a\x00b\r\n\t", offset_stdout=0)

        self.assertEqual(self.read(self.command.pk)["stdout"], "  a\x00b\r\n\t")

    def test_it_decodes_base64(self) -> None:
        payload = base64.b64encode(b"\x00\x01ok").decode()

        response = self.progress(
            self.command.pk, stdout=payload, offset_stdout=0, encoding="base64"
        )

        self.assertEqual(response.json()["offsets"]["stdout"], 4)

    def test_it_tells_the_agent_to_cancel(self) -> None:
        self.client.post(f"/api/commands/{self.command.pk}/cancel/")

        self.assertTrue(self.progress(self.command.pk).json()["cancel"])

    def test_it_stores_nothing_for_a_finished_command(self) -> None:
        self.result(self.command.pk, success=True, exit_code=0, stdout="done", offset_stdout=0)

        response = self.progress(self.command.pk, stdout="late", offset_stdout=4)

        self.assertEqual(response.status_code, 200, response.content)
        read = self.read(self.command.pk)
        self.assertEqual((read["status"], read["stdout"]), ("succeeded", "done"))

    def test_it_refuses_bad_input(self) -> None:
        for body in (
            {"stdout": 5},
            {"offset_stdout": -1, "stdout": "x"},
            {"encoding": "latin-1", "stdout": "x"},
            {"stdout": "not base64!", "encoding": "base64"},
            {"stdout": "x", "dropped_stdout": 3},  # a hole with no offset to end at
            {"stdout": "x", "offset_stdout": 2, "dropped_stdout": 3},  # before the start
            {"stdout": "x", "offset_stdout": 2**62, "dropped_stdout": 2**63},
            {"stdout": "x", "offset_stdout": 2, "dropped_stdout": -1},
        ):
            with self.subTest(body=body):
                self.assertError(self.progress(self.command.pk, **body), 400, "invalid")
        self.assertFalse(self.command.chunks.exists())

    def test_it_validates_ownership(self) -> None:
        bobs = self.queue(agent=self.bob_agent)

        self.assertError(self.progress(bobs.pk, stdout="x"), 404, "not_found")
        bobs.refresh_from_db()
        self.assertEqual(bobs.status, "queued")
        self.assertFalse(bobs.chunks.exists())
