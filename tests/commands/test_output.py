"""apply_chunks: each byte stored once, in offset order, up to the output cap."""

from django.test import override_settings

from tether.commands.models import OutputChunk
from tether.commands.output import Chunk, apply_chunks, read_output
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
        return read_output(self.command, stream)[0]

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
    def test_it_truncates_at_the_cap_and_keeps_counting(self) -> None:
        self.apply(Chunk("stdout", b"12345", 0))
        self.apply(Chunk("stdout", b"67890", 5), Chunk("stderr", b"abc", 0))

        self.assertEqual(self.stored("stdout"), b"12345678")
        self.assertEqual(self.stored("stderr"), b"")
        self.command.refresh_from_db()
        self.assertTrue(self.command.truncated)
        self.assertEqual(self.command.stored_bytes, 8)
        # The logical ends go on: the agent is not asked to resend what was dropped.
        self.assertEqual(self.command.stdout_end, 10)
        self.assertEqual(self.command.stderr_end, 3)

    @override_settings(MAX_OUTPUT_BYTES=4)
    def test_it_accepts_chunks_after_the_cap_without_a_gap(self) -> None:
        self.apply(Chunk("stdout", b"123456", 0))
        self.apply(Chunk("stdout", b"789", 6))

        self.assertEqual(self.stored(), b"1234")
        self.assertEqual(self.command.stdout_end, 9)
        self.assertEqual(self.command.stored_bytes, 4)
        self.assertTrue(self.command.truncated)

    @override_settings(MAX_OUTPUT_BYTES=5)
    def test_it_does_not_truncate_output_that_fits_exactly(self) -> None:
        self.apply(Chunk("stdout", b"12345", 0))

        self.assertFalse(self.command.truncated)
        self.assertEqual(self.stored(), b"12345")
