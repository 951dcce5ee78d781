"""What an agent reports of a command, as the services understand it, whichever dialect sent
it. Tether's agent sends offsets and sizes; the original system's agents send offset-less
progress and a final result that carries the whole output (DESIGN §3, "Compatibility"). The
difference is settled here, once, so that neither the views nor the services guess at it."""

from dataclasses import dataclass, field
from typing import Any

from rest_framework import exceptions

from . import output
from .models import Command


@dataclass(frozen=True)
class Result:
    """A command's final result. `replace_output`: the whole output, which replaces what
    offset-less progress stored; `error_as_stderr`: a failure text that becomes the stderr
    when none was streamed; `sizes`: how many bytes of each stream the agent sent in all,
    so a shortfall is caught."""

    status: str
    exit_code: int | None = None
    chunks: list[output.Chunk] = field(default_factory=list)
    error: str = ""
    replace_output: bool = False
    error_as_stderr: bool = False
    truncated: bool = False
    sizes: dict[str, int] = field(default_factory=dict)
    started_at: float | None = None


def chunks_from_report(values: dict[str, Any]) -> list[output.Chunk]:
    """The output chunks of a progress or result report (validated input); a payload that is
    not what its `encoding` says is a 400."""
    chunks = []
    for stream in output.STREAMS:
        text = values.get(stream)
        dropped = values.get(f"dropped_{stream}") or 0
        if text is None and not dropped:
            continue
        try:
            payload = output.decode_payload(text or "", values["encoding"])
        except ValueError as exc:
            raise exceptions.ValidationError({stream: [str(exc)]}) from exc
        offset = values.get(f"offset_{stream}")
        chunks.append(output.Chunk(stream=stream, data=payload, offset=offset, dropped=dropped))
    return chunks


def result_from_report(values: dict[str, Any]) -> Result:
    """Read a result report of either dialect. A report with neither sizes nor offsets is the
    older dialect's: its final result (`append: false`) carries the whole output, and its
    `error` (read as stderr) or `return_code` (read as exit_code) stand for Tether's fields.
    A result without output replaces nothing."""
    error = values.get("error") or ""
    sizes = {
        stream: values[f"{stream}_size"] for stream in output.STREAMS if f"{stream}_size" in values
    }
    legacy = not sizes and all(values.get(f"offset_{s}") is None for s in output.STREAMS)
    replace = legacy and not values["append"] and values.get("stdout") is not None
    error_as_stderr = legacy and bool(error) and values.get("stderr") is None
    if replace and error_as_stderr:
        # The whole output replaces what was stored; the failure text is its stderr.
        values = {**values, "stderr": error}
    status = values.get("status") or (
        Command.Status.SUCCEEDED if values["success"] else Command.Status.FAILED
    )
    return Result(
        status=status,
        exit_code=values.get("exit_code", values.get("return_code")),
        chunks=chunks_from_report(values),
        error=error,
        replace_output=replace,
        error_as_stderr=error_as_stderr and not replace,
        truncated=values["truncated"],
        sizes=sizes,
        started_at=values.get("started_at"),
    )
