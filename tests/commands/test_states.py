"""The command state table: one function decides which moves are allowed."""

from django.test import SimpleTestCase

from tether.commands.models import Command
from tether.commands.states import ACTIVE, FINAL, can_transition, is_final

S = Command.Status


class StatesTestCase(SimpleTestCase):
    def test_final_states_are_terminal(self) -> None:
        for final in FINAL - {S.LOST}:
            for new in S.values:
                with self.subTest(current=final, new=new):
                    self.assertFalse(can_transition(final, new))

    def test_lost_yields_only_to_an_outcome_the_agent_reports(self) -> None:
        for new in S.values:
            with self.subTest(new=new):
                self.assertEqual(can_transition(S.LOST, new), new in FINAL - {S.LOST, S.EXPIRED})

    def test_only_a_queued_command_expires(self) -> None:
        for current in S.values:
            with self.subTest(current=current):
                self.assertEqual(can_transition(current, S.EXPIRED), current == S.QUEUED)

    def test_it_knows_which_states_are_final(self) -> None:
        self.assertEqual(
            {s for s in S.values if is_final(s)},
            {"succeeded", "failed", "timed_out", "cancelled", "lost", "skipped", "expired"},
        )
        self.assertEqual(set(ACTIVE), {"delivered", "running"})

    def test_a_held_run_target_is_only_released_or_cancelled(self) -> None:
        for new in S.values:
            with self.subTest(new=new):
                self.assertEqual(can_transition(S.HELD, new), new in (S.QUEUED, S.CANCELLED))

    def test_a_queued_command_can_be_cancelled(self) -> None:
        self.assertTrue(can_transition(S.QUEUED, S.CANCELLED))

    def test_a_queued_command_can_be_delivered(self) -> None:
        self.assertTrue(can_transition(S.QUEUED, S.DELIVERED))

    def test_a_delivered_command_can_be_delivered_again(self) -> None:
        self.assertTrue(can_transition(S.DELIVERED, S.DELIVERED))

    def test_a_result_may_finish_a_command_from_any_live_state(self) -> None:
        for current in (S.QUEUED, S.DELIVERED, S.RUNNING):
            for final in FINAL - {S.EXPIRED}:
                with self.subTest(current=current, new=final):
                    self.assertTrue(can_transition(current, final))

    def test_it_never_goes_backwards(self) -> None:
        self.assertFalse(can_transition(S.RUNNING, S.QUEUED))
        self.assertFalse(can_transition(S.RUNNING, S.DELIVERED))
        self.assertFalse(can_transition(S.DELIVERED, S.QUEUED))
        self.assertFalse(can_transition(S.QUEUED, S.QUEUED))

    def test_it_refuses_unknown_states(self) -> None:
        self.assertFalse(can_transition("bogus", S.RUNNING))
        self.assertFalse(can_transition(S.QUEUED, "bogus"))
