"""Command output: stored once per byte, in offset order; past the cap, a head and a rolling
tail of each stream (DESIGN §3, docs/agent-protocol.md "Output limits")."""

import base64
import binascii
from dataclasses import dataclass

from django.conf import settings
from django.db.models.functions import Length

from tether.errors import Conflict

from .models import Command, OutputChunk

STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class Chunk:
    stream: str
    data: bytes
    # None: the older dialect's "append where the stream ends now".
    offset: int | None = None
    # The agent dropped the `dropped` bytes before `offset` (its own spool limit, a full
    # disk): they will never come, and the stream may continue at `offset`.
    dropped: int = 0


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


def apply_chunks(command: Command, chunks: list[Chunk]) -> dict[str, int]:
    """Store the new bytes of each chunk on `command` (caller saves it, in one transaction).

    Bytes before a stream's end are skipped, so a resent chunk is a no-op; a chunk that
    starts past the end would leave a hole, so the whole call is refused before anything is
    written, unless the agent declares that hole dropped (`Chunk.dropped`). A stream longer
    than MAX_OUTPUT_BYTES keeps its first half (the head) and its last half (the tail, which
    rolls): the bytes between are counted in `<stream>_dropped` and their rows deleted here,
    so storage stays bounded and each chunk costs a few queries, never a rewrite of the
    stream. `<stream>_dropped` is always the stream's end minus the bytes stored of it.
    Returns how many bytes of each stream the agent declared dropped in this call.
    """
    for chunk in chunks:
        if chunk.offset is not None and chunk.offset - chunk.dropped > _end(command, chunk.stream):
            raise gap(command, chunk.stream)
    skipped = dict.fromkeys(STREAMS, 0)
    for chunk in chunks:
        end = _end(command, chunk.stream)
        if chunk.offset is not None and chunk.offset > end:
            _skip(command, chunk.stream, end, chunk.offset)
            skipped[chunk.stream] += chunk.offset - end
            end = chunk.offset
        start = end if chunk.offset is None else chunk.offset
        new = chunk.data[end - start :]
        if new:
            _store(command, chunk.stream, end, new)
    return skipped


def _end(command: Command, stream: str) -> int:
    return getattr(command, f"{stream}_end")


def _count_dropped(command: Command, stream: str, count: int) -> None:
    if count > 0:
        field = f"{stream}_dropped"
        setattr(command, field, getattr(command, field) + count)
        command.truncated = True


def _skip(command: Command, stream: str, end: int, to: int) -> None:
    """The agent dropped [end, to): the stream ends at `to` now, and the tail window moves
    with it (what it held before the hole is older than the window)."""
    head, tail = window(settings.MAX_OUTPUT_BYTES)
    _count_dropped(command, stream, to - end)
    setattr(command, f"{stream}_end", to)
    _evict(command, stream, head, max(head, to - tail))


def _store(command: Command, stream: str, end: int, new: bytes) -> None:
    head, tail = window(settings.MAX_OUTPUT_BYTES)
    new_end = end + len(new)
    # The tail keeps [tail_start, end of stream); [head, tail_start) is dropped. Rows before
    # `end - tail` are gone already (each call evicts up to its own tail start).
    tail_start = max(head, new_end - tail)
    pieces = []
    if end < head:
        # Split at `head`: no row ever spans the head's end, so eviction never touches it.
        pieces.append((end, new[: head - end]))
    first = max(end, head, tail_start)
    if first < new_end:
        pieces.append((first, new[first - end :]))
    # The new bytes that fall between the head and the tail are never stored.
    _count_dropped(command, stream, first - max(end, head))
    if tail_start > max(head, end - tail):
        _evict(command, stream, head, tail_start)
    for offset, data in pieces:
        OutputChunk.objects.create(command=command, stream=stream, offset=offset, data=data)
        command.stored_bytes += len(data)
    setattr(command, f"{stream}_end", new_end)


def _evict(command: Command, stream: str, head: int, tail_start: int) -> None:
    """Delete the rows of `stream` in [head, tail_start), counting their bytes dropped; the
    one row that crosses `tail_start` keeps its part inside the tail (it moves there)."""
    if tail_start <= head:
        return
    rows = list(
        OutputChunk.objects.filter(
            command=command, stream=stream, offset__gte=head, offset__lt=tail_start
        )
        .order_by("offset")
        .values_list("id", "offset", Length("data"))
    )
    if not rows:
        return
    removed = sum(size for _, _, size in rows)
    row_id, offset, size = rows[-1]
    if offset + size > tail_start:
        data = OutputChunk.objects.values_list("data", flat=True).get(pk=row_id)
        kept = bytes(data)[tail_start - offset :]
        OutputChunk.objects.filter(pk=row_id).update(offset=tail_start, data=kept)
        removed -= len(kept)
        rows.pop()
    if rows:
        OutputChunk.objects.filter(pk__in=[row[0] for row in rows]).delete()
    command.stored_bytes -= removed
    _count_dropped(command, stream, removed)


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
