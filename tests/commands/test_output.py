"""apply_chunks: each byte stored once, in offset order; past the output cap a stream keeps
its head and a rolling tail, with the dropped middle counted and marked."""

import random

from django.test import override_settings

from tether.commands.models import OutputChunk
from tether.commands.output import (
    Chunk,
    apply_chunks,
    discard_output,
    dropped_marker,
    output_text,
    read_output,
)
from tether.errors import Conflict

from ..base import BaseTestCase


class ApplyChunksTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.command = self.running("make-believe")

    def apply(self, *chunks: Chunk) -> None:
        apply_chunks(self.command, list(chunks))
        self.command.save()

    def stored(self, stream: str = "stdout") -> bytes:
        return read_output(self.command, stream)

    def rows(self, stream: str = "stdout") -> list[tuple[int, bytes]]:
        chunks = self.command.chunks.filter(stream=stream).order_by("offset")
        return [(c.offset, bytes(c.data)) for c in chunks]

    def send(self, data: bytes, size: int, stream: str = "stdout") -> None:
        """`data` as an agent sends it: chunks of `size` bytes at their offsets."""
        for offset in range(0, len(data), size):
            self.apply(Chunk(stream, data[offset : offset + size], offset))

    def test_it_stores_chunks_in_order(self) -> None:
        self.apply(Chunk("stdout", b"hello ", 0))
        self.apply(Chunk("stdout", b"world", 6), Chunk("stderr", b"oops", 0))

        self.assertEqual(self.stored("stdout"), b"hello world")
        self.assertEqual(self.stored("stderr"), b"oops")
        self.command.refresh_from_db()
        self.assertEqual(self.command.stdout_end, 11)
        self.assertEqual(self.command.stderr_end, 4)
        self.assertEqual(self.command.stored_bytes, 15)
        self.assertFalse(self.command.truncated)

    def test_it_treats_a_resend_as_a_no_op(self) -> None:
        self.apply(Chunk("stdout", b"hello", 0))
        self.apply(Chunk("stdout", b"hello", 0))

        self.assertEqual(self.stored(), b"hello")
        self.assertEqual(self.command.chunks.count(), 1)
        self.assertEqual(self.command.stdout_end, 5)
        self.assertEqual(self.command.stored_bytes, 5)

    def test_it_stores_only_the_new_suffix_of_an_overlapping_chunk(self) -> None:
        self.apply(Chunk("stdout", b"hello", 0))
        self.apply(Chunk("stdout", b"llo world", 2))

        self.assertEqual(self.stored(), b"hello world")
        second = self.command.chunks.get(offset=5)
        self.assertEqual(bytes(second.data), b" world")
        self.assertEqual(self.command.stored_bytes, 11)

    def test_it_skips_a_chunk_wholly_before_the_end(self) -> None:
        self.apply(Chunk("stdout", b"hello world", 0))
        self.apply(Chunk("stdout", b"ll", 2))

        self.assertEqual(self.stored(), b"hello world")
        self.assertEqual(self.command.chunks.count(), 1)

    def test_it_refuses_a_chunk_past_the_end(self) -> None:
        self.apply(Chunk("stdout", b"hello", 0))

        with self.assertRaises(Conflict) as caught:
            self.apply(Chunk("stdout", b"world", 6))

        self.assertEqual(caught.exception.error_code, "offset_gap")
        self.assertEqual(caught.exception.status_code, 409)
        self.assertEqual(caught.exception.extra["expected"], {"stdout": 5, "stderr": 0})
        self.assertEqual(self.stored(), b"hello")
        self.assertEqual(self.command.stdout_end, 5)

    def test_it_stores_nothing_of_the_other_stream_when_one_has_a_gap(self) -> None:
        with self.assertRaises(Conflict):
            # The good stderr chunk comes first: it must not be written either.
            self.apply(Chunk("stderr", b"fine", 0), Chunk("stdout", b"late", 3))

        self.assertFalse(OutputChunk.objects.filter(command=self.command).exists())
        self.assertEqual(self.command.stderr_end, 0)
        self.assertEqual(self.command.stored_bytes, 0)

    def test_it_appends_chunks_without_an_offset(self) -> None:
        self.apply(Chunk("stdout", b"line 1\n"))
        self.apply(Chunk("stdout", b"line 2\n"))

        self.assertEqual(self.stored(), b"line 1\nline 2\n")
        self.assertEqual(self.command.stdout_end, 14)

    def test_it_keeps_bytes_that_are_not_utf8(self) -> None:
        self.apply(Chunk("stdout", b"\xff\x00\xfe", 0))

        self.assertEqual(self.stored(), b"\xff\x00\xfe")

    def test_it_ignores_an_empty_chunk(self) -> None:
        self.apply(Chunk("stdout", b"", 0))

        self.assertFalse(self.command.chunks.exists())
        self.assertEqual(self.command.stdout_end, 0)

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_it_keeps_the_head_and_the_tail_past_the_cap(self) -> None:
        self.send(b"0123456789ab", 3)

        self.assertEqual(self.stored(), b"0123" + dropped_marker(4).encode() + b"89ab")
        self.command.refresh_from_db()
        self.assertTrue(self.command.truncated)
        self.assertEqual(self.command.stdout_dropped, 4)
        self.assertEqual(self.command.stored_bytes, 8)
        # The logical end goes on: the agent is not asked to resend what was dropped.
        self.assertEqual(self.command.stdout_end, 12)

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_the_tail_rolls_and_storage_stays_within_the_cap(self) -> None:
        data = bytes(range(65, 65 + 40))
        for offset in range(0, len(data), 3):
            self.apply(Chunk("stdout", data[offset : offset + 3], offset))
            stored = sum(len(chunk) for _, chunk in self.rows())
            self.assertLessEqual(stored, 8)
            self.assertEqual(stored, self.command.stored_bytes)

        self.assertEqual(b"".join(chunk for offset, chunk in self.rows() if offset < 4), data[:4])
        self.assertEqual(b"".join(chunk for offset, chunk in self.rows() if offset >= 4), data[-4:])
        self.assertEqual(self.command.stdout_dropped, 32)

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_the_marker_says_exactly_how_many_bytes_were_dropped(self) -> None:
        self.apply(Chunk("stdout", b"x" * 12_345_678 + b"error: disk full\n", 0))

        text = output_text(self.command, "stdout")
        self.assertEqual(text, "xxxx\n[... 12,345,687 bytes dropped ...]\null\n")
        self.assertEqual(self.command.stdout_dropped, 12_345_687)

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_it_treats_a_resend_after_the_cap_as_a_no_op(self) -> None:
        self.send(b"0123456789ab", 4)
        before = (self.rows(), self.command.stored_bytes, self.command.stdout_dropped)

        self.apply(Chunk("stdout", b"4567", 4))  # dropped bytes, sent again
        self.apply(Chunk("stdout", b"89ab", 8))  # tail bytes, sent again
        self.apply(Chunk("stdout", b"0123456789ab", 0))  # all of it

        self.assertEqual(
            (self.rows(), self.command.stored_bytes, self.command.stdout_dropped), before
        )
        self.assertEqual(self.command.stdout_end, 12)

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_it_refuses_a_gap_after_the_cap(self) -> None:
        self.send(b"0123456789ab", 4)

        with self.assertRaises(Conflict) as caught:
            self.apply(Chunk("stdout", b"zz", 13))

        self.assertEqual(caught.exception.extra["expected"], {"stdout": 12, "stderr": 0})
        self.assertEqual(self.stored(), b"0123" + dropped_marker(4).encode() + b"89ab")

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_output_that_fits_exactly_is_whole(self) -> None:
        self.send(b"01234567", 3)

        self.assertEqual(self.stored(), b"01234567")
        self.assertFalse(self.command.truncated)
        self.assertEqual(self.command.stdout_dropped, 0)

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_one_byte_past_the_cap_drops_one_byte(self) -> None:
        self.send(b"012345678", 3)

        self.assertEqual(self.stored(), b"0123" + dropped_marker(1).encode() + b"5678")
        self.assertEqual(self.command.stdout_dropped, 1)
        self.assertTrue(self.command.truncated)

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_a_chunk_across_the_head_end_is_split_there(self) -> None:
        self.apply(Chunk("stdout", b"012345", 0))  # crosses the head's end (4)

        self.assertEqual(self.rows(), [(0, b"0123"), (4, b"45")])
        self.assertEqual(self.stored(), b"012345")

        self.apply(Chunk("stdout", b"6789abcdef", 6))

        self.assertEqual(self.rows(), [(0, b"0123"), (12, b"cdef")])

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_a_stored_chunk_across_the_tail_start_keeps_its_tail_part(self) -> None:
        self.apply(Chunk("stdout", b"0123", 0))
        self.apply(Chunk("stdout", b"4567", 4))
        self.apply(Chunk("stdout", b"89", 8))  # the tail now starts at 6, inside [4, 8)

        self.assertEqual(self.rows(), [(0, b"0123"), (6, b"67"), (8, b"89")])
        self.assertEqual(self.command.stored_bytes, 8)
        self.assertEqual(self.stored(), b"0123" + dropped_marker(2).encode() + b"6789")

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_each_stream_keeps_its_own_head_and_tail(self) -> None:
        self.apply(Chunk("stderr", b"warn\n", 0))
        self.send(b"o" * 100, 10)
        self.apply(Chunk("stderr", b"fatal\n", 5))

        self.assertEqual(self.stored("stdout"), b"oooo" + dropped_marker(92).encode() + b"oooo")
        self.assertEqual(self.stored("stderr"), b"warn" + dropped_marker(3).encode() + b"tal\n")
        self.assertEqual((self.command.stdout_dropped, self.command.stderr_dropped), (92, 3))
        self.assertEqual(self.command.stored_bytes, 16)

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_whole_output_sent_again_at_the_end_keeps_the_same_head_and_tail(self) -> None:
        # The older dialect: progress without offsets, then a final result carrying it all.
        self.apply(Chunk("stdout", b"0123456"))
        discard_output(self.command)
        self.apply(Chunk("stdout", b"0123456789ab"))

        self.assertEqual(self.stored(), b"0123" + dropped_marker(4).encode() + b"89ab")
        self.assertEqual(self.command.stdout_dropped, 4)
        self.assertEqual(self.command.stored_bytes, 8)

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_a_character_cut_by_the_drop_reads_as_its_replacement(self) -> None:
        # "é" is two bytes, "€" three: the head ends in the first of é, the tail starts in €.
        self.send("abcé".encode() + b"xxxx" + "€yz".encode(), 5)

        text = output_text(self.command, "stdout")
        self.assertEqual(text, "abc\ufffd" + dropped_marker(6) + "\ufffd\ufffdyz")

    def test_a_hole_the_agent_declares_is_counted_and_marked(self) -> None:
        self.apply(Chunk("stdout", b"01", 0))
        self.apply(Chunk("stdout", b"56", 5, dropped=3))  # the agent lost [2, 5): disk full

        self.assertEqual(self.stored(), b"01" + dropped_marker(3).encode() + b"56")
        self.assertEqual((self.command.stdout_end, self.command.stdout_dropped), (7, 3))
        self.assertEqual(self.command.stored_bytes, 4)
        self.assertTrue(self.command.truncated)

    def test_a_declared_hole_sent_again_changes_nothing(self) -> None:
        self.apply(Chunk("stdout", b"01", 0))
        self.apply(Chunk("stdout", b"56", 5, dropped=3))
        before = (self.rows(), self.command.stored_bytes, self.command.stdout_dropped)

        self.apply(Chunk("stdout", b"56", 5, dropped=3))
        self.apply(Chunk("stdout", b"6", 6, dropped=4))  # a wider claim over stored bytes

        self.assertEqual(
            (self.rows(), self.command.stored_bytes, self.command.stdout_dropped), before
        )

    def test_a_hole_that_does_not_reach_the_stored_end_is_refused(self) -> None:
        self.apply(Chunk("stdout", b"01", 0))

        with self.assertRaises(Conflict):
            self.apply(Chunk("stdout", b"9", 9, dropped=3))  # says [6, 9), [2, 6) is missing

        self.assertEqual((self.stored(), self.command.stdout_dropped), (b"01", 0))

    def test_a_hole_at_the_end_of_a_stream_is_marked(self) -> None:
        self.apply(Chunk("stdout", b"last words", 0))
        self.apply(Chunk("stdout", b"", 15, dropped=5))

        self.assertEqual(self.stored(), b"last words" + dropped_marker(5).encode())
        self.assertEqual((self.command.stdout_end, self.command.stdout_dropped), (15, 5))

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_a_hole_past_the_cap_moves_the_tail_to_what_follows_it(self) -> None:
        self.send(b"0123456789", 2)  # head 0123, tail 6789
        self.apply(Chunk("stdout", b"wxyz", 100, dropped=90))  # the agent's spool dropped 90

        self.assertEqual(self.stored(), b"0123" + dropped_marker(96).encode() + b"wxyz")
        self.assertEqual(self.rows(), [(0, b"01"), (2, b"23"), (100, b"wxyz")])
        self.assertEqual((self.command.stdout_dropped, self.command.stored_bytes), (96, 8))

    @override_settings(MAX_OUTPUT_BYTES=8)
    def test_the_tail_keeps_what_preceded_a_short_hole(self) -> None:
        self.send(b"012345", 2)
        self.apply(Chunk("stdout", b"9", 9, dropped=3))  # end 10: the tail is [6, 10)

        self.assertEqual(self.stored(), b"0123" + dropped_marker(5).encode() + b"9")
        self.apply(Chunk("stdout", b"ab", 10))  # the tail is [8, 12): 9ab

        self.assertEqual(self.stored(), b"0123" + dropped_marker(5).encode() + b"9ab")
        self.assertEqual((self.command.stdout_dropped, self.command.stored_bytes), (5, 7))

    def test_any_holes_keep_the_counts_true(self) -> None:
        """Whatever the agent sends and drops, the readers show exactly the head and the
        tail windows less the holes, and `<stream>_dropped` is the end less what is stored."""
        for cap in (0, 5, 16, 64, 1000):
            for seed in range(6):
                with self.subTest(cap=cap, seed=seed), self.settings(MAX_OUTPUT_BYTES=cap):
                    rng = random.Random(seed * 7919 + cap)
                    discard_output(self.command)
                    known: list[int | None] = []  # None: a byte the agent dropped
                    while len(known) < 200:
                        if rng.random() < 0.25:
                            hole = rng.randrange(1, 30)
                            data = bytes(rng.randrange(256) for _ in range(rng.randrange(6)))
                            offset = len(known) + hole
                            self.apply(Chunk("stdout", data, offset, dropped=hole))
                            known += [None] * hole
                        else:
                            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
                            self.apply(Chunk("stdout", data, len(known)))
                        known += list(data)

                    self.assertEqual(self.stored(), self.expected_view(known, cap))
                    stored = sum(len(chunk) for _, chunk in self.rows())
                    self.assertEqual(stored, self.command.stored_bytes)
                    end = self.command.stdout_end
                    self.assertEqual((end, self.command.stdout_dropped), (len(known), end - stored))

    @staticmethod
    def expected_view(known: list[int | None], cap: int) -> bytes:
        """What read_output should give: kept bytes in order, one marker per missing run."""
        head, tail = cap // 2, cap - cap // 2
        view, missing = bytearray(), 0
        for offset, byte in enumerate(known):
            kept = byte is not None and (offset < head or offset >= len(known) - tail)
            if not kept:
                missing += 1
                continue
            if missing:
                view += dropped_marker(missing).encode()
                missing = 0
            view.append(byte)  # type: ignore[arg-type]
        if missing:
            view += dropped_marker(missing).encode()
        return bytes(view)

    def test_any_chunking_and_resending_stores_the_same_head_and_tail(self) -> None:
        data = bytes(random.Random(13).randrange(256) for _ in range(300))
        for cap in (0, 1, 7, 64, 300, 1000):
            with self.subTest(cap=cap), self.settings(MAX_OUTPUT_BYTES=cap):
                rng = random.Random(cap)
                discard_output(self.command)
                sent = 0
                while sent < len(data):
                    start = max(0, sent - rng.randrange(8))  # some overlap: resent bytes
                    size = rng.randrange(1, 40)
                    self.apply(Chunk("stdout", data[start : start + size], start))
                    sent = max(sent, start + size)

                head, dropped = cap // 2, max(0, len(data) - cap)
                expected = data
                if dropped:
                    marker = dropped_marker(dropped).encode()
                    expected = data[:head] + marker + data[head + dropped :]
                self.assertEqual(self.stored(), expected)
                self.assertEqual(self.command.stdout_dropped, dropped)
                self.assertEqual(self.command.stored_bytes, min(len(data), cap))
                stored = sum(len(chunk) for _, chunk in self.rows())
                self.assertEqual(stored, self.command.stored_bytes)
