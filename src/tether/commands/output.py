"""Command output: stored once per byte, in offset order; past the cap, a head and a rolling
tail of each stream (DESIGN §3, docs/agent-protocol.md "Output limits")."""

import base64
import binascii
from dataclasses import dataclass

from django.conf import settings

from tether.errors import Conflict

from .models import Command, OutputChunk

STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class Chunk:
    stream: str
    data: bytes
    # None: the older dialect's "append where the stream ends now".
    offset: int | None = None


def decode_payload(value: str, encoding: str) -> bytes:
    """Bytes of a chunk as sent; raises ValueError on a malformed base64 payload."""
    if encoding == "base64":
        try:
            return base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise ValueError("stdout/stderr are not valid base64") from exc
    return value.encode("utf-8", "surrogatepass")


def ends(command: Command) -> dict[str, int]:
    return {"stdout": command.stdout_end, "stderr": command.stderr_end}


def gap(command: Command, stream: str) -> Conflict:
    return Conflict(
        f"{stream} chunk starts past the stored end; resend from the expected offset",
        code="offset_gap",
        expected=ends(command),
    )


def dropped_marker(count: int) -> str:
    """The line readers put where a stream's middle was dropped: one form everywhere (API
    text, streams, console, downloads), so a script can find it."""
    return f"\n[... {count:,} bytes dropped ...]\n"


def window(cap: int) -> tuple[int, int]:
    """How many bytes of each stream the head keeps, and how many the tail keeps."""
    head = cap // 2
    return head, cap - head


def apply_chunks(command: Command, chunks: list[Chunk]) -> None:
    """Store the new bytes of each chunk on `command` (caller saves it, in one transaction).

    Bytes before a stream's end are skipped, so a resent chunk is a no-op; a chunk that
    starts past the end would leave a hole, so the whole call is refused before anything is
    written. A stream longer than MAX_OUTPUT_BYTES keeps its first half (the head) and its
    last half (the tail, which rolls): the bytes between are counted in `<stream>_dropped`
    and their rows deleted here, so storage stays bounded and each chunk costs a few
    queries, never a rewrite of the stream.
    """
    for chunk in chunks:
        if chunk.offset is not None and chunk.offset > getattr(command, f"{chunk.stream}_end"):
            raise gap(command, chunk.stream)
    for chunk in chunks:
        end = getattr(command, f"{chunk.stream}_end")
        start = end if chunk.offset is None else chunk.offset
        new = chunk.data[end - start :]
        if new:
            _store(command, chunk.stream, end, new)
            setattr(command, f"{chunk.stream}_end", end + len(new))


def _store(command: Command, stream: str, end: int, new: bytes) -> None:
    head, tail = window(settings.MAX_OUTPUT_BYTES)
    new_end = end + len(new)
    # The tail keeps [tail_start, end of stream); [head, tail_start) is dropped.
    old_start = max(head, end - tail)
    tail_start = max(head, new_end - tail)
    pieces = []
    if end < head:
        # Split at `head`: no row ever spans the head's end, so eviction never touches it.
        pieces.append((end, new[: head - end]))
    first = max(end, head, tail_start)
    if first < new_end:
        pieces.append((first, new[first - end :]))
    if tail_start > old_start:
        _evict(command, stream, head, tail_start)
        # What left storage now: the stored part of [old_start, tail_start).
        command.stored_bytes -= max(0, min(tail_start, end) - old_start)
        dropped = f"{stream}_dropped"
        setattr(command, dropped, getattr(command, dropped) + tail_start - old_start)
        command.truncated = True
    for offset, data in pieces:
        OutputChunk.objects.create(command=command, stream=stream, offset=offset, data=data)
        command.stored_bytes += len(data)


def _evict(command: Command, stream: str, head: int, tail_start: int) -> None:
    """Delete the rows of `stream` in [head, tail_start); the one row that crosses
    `tail_start` keeps its part inside the tail (it moves to `tail_start`)."""
    keep_from = tail_start
    crossing = (
        OutputChunk.objects.filter(
            command=command, stream=stream, offset__gte=head, offset__lt=tail_start
        )
        .order_by("-offset")
        .values_list("id", "offset", "data")
        .first()
    )
    if crossing is not None:
        row_id, offset, data = crossing
        if offset + len(data) > tail_start:
            kept = bytes(data)[tail_start - offset :]
            OutputChunk.objects.filter(pk=row_id).update(offset=tail_start, data=kept)
            keep_from = offset
    OutputChunk.objects.filter(
        command=command, stream=stream, offset__gte=head, offset__lt=keep_from
    ).delete()


def discard_output(command: Command) -> None:
    """Forget stored output, for the older dialect's final result that carries it whole."""
    command.chunks.all().delete()
    command.stdout_end = command.stderr_end = command.stored_bytes = 0
    command.stdout_dropped = command.stderr_dropped = 0
    command.truncated = False


def stored_runs(command: Command, stream: str, after: int = 0) -> list[tuple[int, bytes]]:
    """The stored bytes of `stream` from offset `after` on, as contiguous runs
    [(offset, bytes)]: one run, or a head and a tail with the dropped middle between."""
    if getattr(command, f"{stream}_end") <= after:
        return []  # nothing stored past it (a command just queued): no query
    runs: list[tuple[int, bytearray]] = []
    rows = (
        OutputChunk.objects.filter(command=command, stream=stream, offset__gte=after)
        .order_by("offset")
        .values_list("offset", "data")
    )
    for offset, payload in rows:
        if runs and runs[-1][0] + len(runs[-1][1]) == offset:
            runs[-1][1].extend(payload)
        else:
            runs.append((offset, bytearray(payload)))
    return [(offset, bytes(data)) for offset, data in runs]


def read_output(command: Command, stream: str) -> bytes:
    """What a reader gets of `stream`: the stored bytes, with the dropped marker (UTF-8)
    where bytes were dropped."""
    data = bytearray()
    end = 0
    for offset, run in stored_runs(command, stream):
        if offset > end:
            data += dropped_marker(offset - end).encode()
        data += run
        end = offset + len(run)
    if end < getattr(command, f"{stream}_end"):  # no tail at all (a cap below 2 bytes)
        data += dropped_marker(getattr(command, f"{stream}_end") - end).encode()
    return bytes(data)


def output_text(command: Command, stream: str) -> str:
    """`stream` as text. A character cut where the middle was dropped becomes U+FFFD, as
    the streams show it: the marker is ASCII, so the decoder never joins head and tail."""
    return read_output(command, stream).decode("utf-8", "replace")
