"""POST /api/agents/command/{id}/result/ (both dialects), driven as the agent would."""

import base64
import time

from rest_framework.test import APIClient

from tether.accounts.services import create_api_token
from tether.commands.models import Command

from ..base import BaseTestCase


class ResultTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.command = self.running("make-believe")
        self.url = f"/api/agents/command/{self.command.pk}/result/"

    def reload(self) -> Command:
        self.command.refresh_from_db()
        return self.command

    def test_it_works(self) -> None:
        response = self.result(
            self.command.pk,
            status="succeeded",
            exit_code=0,
            stdout="hello\n",
            offset_stdout=0,
            stdout_size=6,
            stderr_size=0,
            append=True,
        )

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response.json(), {"status": "ok"})
        read = self.read(self.command.pk)
        self.assertEqual(read["status"], "succeeded")
        self.assertEqual(read["exit_code"], 0)
        self.assertEqual(read["stdout"], "hello\n")
        self.assertEqual(read["stderr"], "")
        self.assertIsNotNone(read["finished_at"])
        self.assertIsNone(self.reload().lease_expires_at)

    def test_it_is_served_on_the_plural_path_too(self) -> None:
        response = self.agent_post(
            f"/api/agents/commands/{self.command.pk}/result/", {"success": True, "exit_code": 0}
        )

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(self.reload().status, "succeeded")

    def test_it_is_idempotent(self) -> None:
        self.result(self.command.pk, success=False, exit_code=3, stdout="first", append=False)
        finished_at = self.reload().finished_at

        again = self.result(
            self.command.pk, success=True, exit_code=0, stdout="other", append=False
        )

        self.assertEqual(again.status_code, 200, again.content)
        self.assertEqual(again.json(), {"status": "ok"})
        command = self.reload()
        self.assertEqual(command.status, "failed")
        self.assertEqual(command.exit_code, 3)
        self.assertEqual(command.finished_at, finished_at)
        self.assertEqual(self.read(command.pk)["stdout"], "first")

    def test_it_maps_success_to_a_status(self) -> None:
        self.result(self.command.pk, success=False, exit_code=1)

        self.assertEqual(self.reload().status, "failed")

    def test_it_keeps_timed_out(self) -> None:
        response = self.result(self.command.pk, status="timed_out", exit_code=None, success=False)

        self.assertEqual(response.status_code, 200, response.content)
        command = self.reload()
        self.assertEqual(command.status, "timed_out")
        self.assertIsNone(command.exit_code)

    def test_it_finishes_a_command_whose_ack_was_lost(self) -> None:
        command = self.delivered("second")

        self.result(command.pk, success=True, exit_code=0, started_at=time.time() - 5)

        command.refresh_from_db()
        self.assertEqual(command.status, "succeeded")
        self.assertIsNotNone(command.started_at)
        self.assertLess(command.started_at, command.finished_at)

    def test_legacy_whole_output_replaces_progress_output(self) -> None:
        for part in ("line 1\n", "line 2\n"):
            self.progress(self.command.pk, stdout=part, append=True)
        self.assertEqual(self.read(self.command.pk)["stdout"], "line 1\nline 2\n")

        self.result(
            self.command.pk,
            success=True,
            return_code=0,
            stdout="line 1\nline 2\nline 3\n",
            append=False,
        )

        self.assertEqual(self.read(self.command.pk)["stdout"], "line 1\nline 2\nline 3\n")
        self.assertEqual(self.reload().stored_bytes, 21)

    def test_legacy_append_true_adds_to_progress_output(self) -> None:
        self.progress(self.command.pk, stdout="a")

        self.result(self.command.pk, success=True, stdout="b", append=True)

        self.assertEqual(self.read(self.command.pk)["stdout"], "ab")

    def test_a_legacy_result_without_output_keeps_progress_output(self) -> None:
        self.progress(self.command.pk, stdout="kept")

        self.result(self.command.pk, success=True, return_code=0, append=False)

        self.assertEqual(self.read(self.command.pk)["stdout"], "kept")

    def test_a_legacy_error_only_result_keeps_the_streamed_stdout(self) -> None:
        self.progress(self.command.pk, stdout="partial output\n")

        self.result(self.command.pk, success=False, error="Command timed out", append=False)

        read = self.read(self.command.pk)
        self.assertEqual(read["stderr"], "Command timed out")
        self.assertEqual(read["stdout"], "partial output\n")

    def test_it_reads_return_code_as_exit_code(self) -> None:
        self.result(self.command.pk, success=False, return_code=2)

        self.assertEqual(self.reload().exit_code, 2)

    def test_exit_code_wins_over_return_code(self) -> None:
        self.result(self.command.pk, success=False, exit_code=4, return_code=2)

        self.assertEqual(self.reload().exit_code, 4)

    def test_it_stores_a_legacy_error_as_stderr(self) -> None:
        self.result(self.command.pk, success=False, return_code=1, error="boom\n", append=False)

        read = self.read(self.command.pk)
        self.assertEqual(read["stderr"], "boom\n")
        self.assertEqual(read["error"], "boom\n")

    def test_a_legacy_error_does_not_replace_a_given_stderr(self) -> None:
        self.result(
            self.command.pk, success=False, error="summary", stderr="details\n", append=False
        )

        self.assertEqual(self.read(self.command.pk)["stderr"], "details\n")

    def test_tether_dialect_error_stays_out_of_stderr(self) -> None:
        self.result(
            self.command.pk,
            status="failed",
            exit_code=None,
            error="could not start: no such file",
            stdout_size=0,
            stderr_size=0,
            append=True,
        )

        read = self.read(self.command.pk)
        self.assertEqual(read["stderr"], "")
        self.assertEqual(read["error"], "could not start: no such file")

    def test_it_refuses_a_result_with_missing_output(self) -> None:
        self.progress(self.command.pk, stdout="abc", offset_stdout=0)

        response = self.result(
            self.command.pk,
            status="succeeded",
            exit_code=0,
            stderr="e",
            offset_stderr=0,
            stdout_size=10,
            stderr_size=1,
            append=True,
        )

        error = self.assertError(response, 409, "offset_gap")
        self.assertEqual(error["expected"], {"stdout": 3, "stderr": 1})
        command = self.reload()
        self.assertEqual(command.status, "running")
        # Refused whole: not even this call's stderr was kept.
        self.assertEqual(self.read(command.pk)["stderr"], "")
        self.assertEqual(command.stderr_end, 0)

    def test_it_accepts_the_result_once_the_output_is_complete(self) -> None:
        self.progress(self.command.pk, stdout="abc", offset_stdout=0)
        self.result(self.command.pk, status="succeeded", exit_code=0, stdout_size=6, append=True)

        response = self.result(
            self.command.pk,
            status="succeeded",
            exit_code=0,
            stdout="abcdef",
            offset_stdout=0,
            stdout_size=6,
            append=True,
        )

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(self.read(self.command.pk)["stdout"], "abcdef")

    def test_it_refuses_a_chunk_past_the_end(self) -> None:
        response = self.result(
            self.command.pk, status="succeeded", exit_code=0, stdout="x", offset_stdout=5
        )

        error = self.assertError(response, 409, "offset_gap")
        self.assertEqual(error["expected"], {"stdout": 0, "stderr": 0})
        self.assertEqual(self.reload().status, "running")

    def test_it_decodes_base64(self) -> None:
        payload = base64.b64encode(b"\xff\xfe ok").decode()

        self.result(
            self.command.pk, status="succeeded", stdout=payload, offset_stdout=0, encoding="base64"
        )

        self.assertEqual(self.read(self.command.pk)["stdout"], "\ufffd\ufffd ok")

    def test_it_refuses_bad_base64(self) -> None:
        response = self.result(self.command.pk, success=True, stdout="***", encoding="base64")

        self.assertError(response, 400, "invalid")
        self.assertEqual(self.reload().status, "running")

    def test_it_requires_status_or_success(self) -> None:
        self.assertError(self.result(self.command.pk, exit_code=0), 400, "invalid")
        self.assertEqual(self.reload().status, "running")

    def test_it_refuses_a_status_that_is_not_final(self) -> None:
        for status in ("running", "queued", "exploded"):
            with self.subTest(status=status):
                self.assertError(self.result(self.command.pk, status=status), 400, "invalid")
        self.assertEqual(self.reload().status, "running")

    def test_it_refuses_output_that_is_not_a_string(self) -> None:
        self.assertError(self.result(self.command.pk, success=True, stdout=["a"]), 400)

    def test_it_caps_the_error_text(self) -> None:
        self.result(self.command.pk, status="failed", error="e" * 10000, stderr_size=0)

        self.assertEqual(len(self.reload().error), 4096)

    def test_it_validates_ownership(self) -> None:
        bobs = self.queue(agent=self.bob_agent)

        response = self.result(bobs.pk, success=True, exit_code=0)

        self.assertError(response, 404, "not_found")
        bobs.refresh_from_db()
        self.assertEqual(bobs.status, "queued")

    def test_it_handles_missing_command(self) -> None:
        self.assertError(self.result(999999, success=True), 404, "not_found")

    def test_it_requires_the_agent_token(self) -> None:
        self.agent_client.credentials()

        self.assertError(self.result(self.command.pk, success=True), 401)
        self.assertEqual(self.reload().status, "running")

    def test_a_human_token_is_not_an_agent_token(self) -> None:
        human = APIClient()
        _, secret = create_api_token(user=self.alice, name="human", expires_in_days=1)
        human.credentials(HTTP_AUTHORIZATION=f"Token {secret}")

        response = human.post(self.url, {"success": True}, format="json")

        self.assertError(response, 401)
        self.assertEqual(self.reload().status, "running")


class ResultRangesTestCase(BaseTestCase):
    def test_numbers_past_what_the_columns_hold_are_refused_and_change_nothing(self) -> None:
        command = self.delivered()
        for field, value in (
            ("exit_code", 2**63),
            ("return_code", -(2**40)),
            ("stdout_size", 2**63),
            ("offset_stdout", 2**63),
        ):
            with self.subTest(field=field):
                self.assertError(self.result(command.pk, status="succeeded", **{field: value}), 400)
                self.assertError(self.progress(command.pk, stdout="x", offset_stdout=2**63), 400)
        command.refresh_from_db()
        self.assertEqual(command.status, "delivered")
        self.assertEqual(self.read(command.pk)["stdout"], "")
