"""Command output: stored once per byte, in offset order, up to a cap (DESIGN §3)."""

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


def apply_chunks(command: Command, chunks: list[Chunk]) -> None:
    """Store the new bytes of each chunk on `command` (caller saves it, in one transaction).

    Bytes before a stream's end are skipped, so a resent chunk is a no-op; a chunk that
    starts past the end would leave a hole, so the whole call is refused before anything is
    written. Past MAX_OUTPUT_BYTES the bytes are counted but dropped and `truncated` is set.
    """
    for chunk in chunks:
        if chunk.offset is not None and chunk.offset > getattr(command, f"{chunk.stream}_end"):
            raise gap(command, chunk.stream)
    for chunk in chunks:
        end = getattr(command, f"{chunk.stream}_end")
        start = end if chunk.offset is None else chunk.offset
        new = chunk.data[end - start :]
        if not new:
            continue
        room = max(0, settings.MAX_OUTPUT_BYTES - command.stored_bytes)
        kept = new[:room]
        if kept:
            OutputChunk.objects.create(command=command, stream=chunk.stream, offset=end, data=kept)
            command.stored_bytes += len(kept)
        if len(kept) < len(new):
            command.truncated = True
        setattr(command, f"{chunk.stream}_end", end + len(new))


def discard_output(command: Command) -> None:
    """Forget stored output, for the older dialect's final result that carries it whole."""
    command.chunks.all().delete()
    command.stdout_end = command.stderr_end = command.stored_bytes = 0
    command.truncated = False


def read_output(command: Command, stream: str, after: int = 0) -> tuple[bytes, int]:
    """The stored bytes of `stream` from offset `after` on, and the offset they end at."""
    if getattr(command, f"{stream}_end") <= after:
        return b"", after  # nothing stored past it (a command just queued): no query
    data = bytearray()
    end = after
    rows = (
        OutputChunk.objects.filter(command=command, stream=stream, offset__gte=after)
        .order_by("offset")
        .values_list("offset", "data")
    )
    for offset, payload in rows:
        data += bytes(payload)
        end = offset + len(payload)
    return bytes(data), end


def output_text(command: Command, stream: str) -> str:
    return read_output(command, stream)[0].decode("utf-8", "replace")
