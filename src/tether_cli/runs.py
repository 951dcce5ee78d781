"""`tetherctl run` against the runs API (docs/runs.md): the request body from the command
line, the request itself (with an `Idempotency-Key`, so that the one retry after a dropped
connection cannot start a second run), following the run's stream to its end, and the final
run with each target's output for `--json`."""

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import render
from .client import Client, Event
from .errors import CliError, ConnectionFailed

PROGRESS_ABOVE = 5  # targets: more than this many get a progress bar
FINAL = {"succeeded", "failed", "timed_out", "cancelled", "lost", "skipped", "expired"}
STREAM_RECONNECTS = 3
LIMIT = re.compile(r"[0-9]+%?")
TRUE_WORDS = {"true", "yes", "on", "1"}
FALSE_WORDS = {"false", "no", "off", "0"}


def command_fields(words: list[str]) -> dict[str, Any]:
    """The words after `--`, joined with spaces into one command line that each host runs
    with `bash -c` (as ssh does): `-- systemctl restart nginx`, `-- 'df -h | grep /srv'`."""
    line = " ".join(words)
    if not line.strip():
        raise CliError("give a command after `--` (or --template ID)")
    return {"command": line}


def parse_limit(value: str | None, option: str) -> int | str | None:
    """`5` or `20%` as the API takes them (a number, or a percentage as text)."""
    if value is None:
        return None
    value = value.strip()
    if not LIMIT.fullmatch(value):
        raise CliError(f"{option}: give a number or a percentage such as 20%, not {value!r}")
    return value if value.endswith("%") else int(value)


def parse_params(pairs: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name.strip():
            raise CliError(f"--param takes NAME=VALUE, not {pair!r}")
        params[name.strip()] = value
    return params


def find_template(client: Client, template: str) -> dict[str, Any]:
    """A template by id, or by its name."""
    if template.isdigit():
        try:
            return client.get(f"/api/agents/command-templates/{template}/")
        except CliError as exc:
            if exc.status == 404:
                raise CliError(
                    f"no command template {template} (not found, or not yours)"
                ) from None
            raise
    for found in client.get_all("/api/agents/command-templates/"):
        if found["name"] == template:
            return found
    raise CliError(f"no command template named {template!r}")


def template_fields(client: Client, template: str, pairs: list[str]) -> dict[str, Any]:
    """`{template, params}`, each value given as its declared type wants it: a boolean
    parameter takes true/false (yes/no, on/off, 1/0), the rest text the server checks."""
    found = find_template(client, template)
    types = {p["name"]: p.get("type", "string") for p in found.get("parameters") or []}
    params: dict[str, Any] = {}
    for name, value in parse_params(pairs).items():
        if types.get(name) == "boolean":
            if value.lower() not in TRUE_WORDS | FALSE_WORDS:
                raise CliError(f"--param {name}: give true or false, not {value!r}")
            params[name] = value.lower() in TRUE_WORDS
        else:
            params[name] = value
    return {"template": found["id"], "params": params}


def start_run(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    """`POST /api/runs/`, retried once with the same `Idempotency-Key` when the connection
    fails: the server answers the retry with the run the first request created, if it did."""
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    try:
        return client.post("/api/runs/", body, headers=headers)
    except ConnectionFailed:
        return client.post("/api/runs/", body, headers=headers)


def cancel_run(client: Client, run_id: int) -> dict[str, Any]:
    return client.post(f"/api/runs/{run_id}/cancel/")


def labels_for(targets: list[dict[str, Any]]) -> dict[int, str]:
    """How each target's output is prefixed: its hostname, or `hostname#id` when several
    targets share the hostname (the same host name on several servers)."""
    seen: dict[str, int] = {}
    for target in targets:
        seen[target["hostname"]] = seen.get(target["hostname"], 0) + 1
    return {
        t["agent"]: t["hostname"] if seen[t["hostname"]] == 1 else f"{t['hostname']}#{t['agent']}"
        for t in targets
    }


@dataclass
class OutputLines:
    """A run's `output` events cut into whole lines, per command and stream. A chunk already
    seen (by its offset, after a reconnect replays the stream) is dropped."""

    partial: dict[tuple[int, str], str] = field(default_factory=dict)
    seen: dict[tuple[int, str], int] = field(default_factory=dict)
    owners: dict[int, tuple[int, str]] = field(default_factory=dict)

    def feed(self, data: dict[str, Any]) -> list[tuple[int, str, str, str]]:
        """The lines completed by this chunk, as (agent, hostname, stream, line)."""
        key = (data["command"], data["stream"])
        self.owners[data["command"]] = (data["agent"], data["hostname"])
        offset = data.get("offset", 0)
        if offset is not None and offset <= self.seen.get(key, -2):
            return []
        # A decoder's tail comes with offset -1; after it, nothing more of this stream.
        self.seen[key] = offset if offset is not None and offset >= 0 else 2**62
        *lines, rest = (self.partial.pop(key, "") + data["data"]).split("\n")
        if rest:
            self.partial[key] = rest
        return [self._line(key, line) for line in lines]

    def flush(self, command: int | None = None) -> list[tuple[int, str, str, str]]:
        """What is left of unterminated lines (of one command, or of all)."""
        keys = sorted(
            (k for k in self.partial if command is None or k[0] == command),
            key=lambda k: (k[0], k[1] != "stdout"),
        )
        return [self._line(key, self.partial.pop(key)) for key in keys]

    def _line(self, key: tuple[int, str], line: str) -> tuple[int, str, str, str]:
        agent, hostname = self.owners[key[0]]
        return agent, hostname, key[1], line.removesuffix("\r")


def follow(client: Client, run_id: int, on_event: Callable[[Event], None]) -> dict[str, Any]:
    """Hand each event of the run's stream to `on_event` until `end`, whose data is returned.
    A dropped stream is opened again (a few times, backing off); `OutputLines` drops what the
    new stream repeats."""
    failures = 0
    while True:
        try:
            for event in client.events(f"/api/runs/{run_id}/stream/"):
                on_event(event)
                if event.name == "end":
                    return event.data
            problem: CliError = ConnectionFailed(f"the stream of run {run_id} ended early")
        except ConnectionFailed as exc:
            problem = exc
        failures += 1
        if failures > STREAM_RECONNECTS:
            raise problem
        time.sleep(2 ** (failures - 1))  # a server restart takes a moment


def with_output(client: Client, run: dict[str, Any]) -> dict[str, Any]:
    """The run, each target with its command's stdout and stderr (from `/api/commands/{id}/`)."""
    for target in run.get("targets") or []:
        if target.get("command"):
            command = client.get(f"/api/commands/{target['command']}/")
            target["stdout"] = command.get("stdout", "")
            target["stderr"] = command.get("stderr", "")
            target["truncated"] = command.get("truncated", False)
            target["stdout_dropped"] = command.get("stdout_dropped", 0)
            target["stderr_dropped"] = command.get("stderr_dropped", 0)
    return run


def run_detail(client: Client, run_id: int) -> dict[str, Any]:
    return client.get(f"/api/runs/{run_id}/")


def watch(client: Client, run: dict[str, Any], labels: dict[int, str]) -> None:
    """Print each target's output live, line by line, with a progress bar past
    `PROGRESS_ABOVE` targets; returns when the run has ended."""
    lines = OutputLines()
    printer = render.RunOutput(labels)
    total = (run.get("counts") or {}).get("total") or len(labels)

    def show(found: list[tuple[int, str, str, str]]) -> None:
        for agent, hostname, stream, text in found:
            printer.line(agent, hostname, stream, text)

    with render.RunProgress(total, shown=total > PROGRESS_ABOVE) as progress:
        printer.above_bar = progress.bar.console if progress.bar else None

        def on_event(event: Event) -> None:
            data = event.data if isinstance(event.data, dict) else {}
            if event.name == "output":
                show(lines.feed(data))
            elif event.name == "status" and data.get("status") in FINAL:
                show(lines.flush(data.get("command")))
            elif event.name == "end":
                show(lines.flush())
            if event.name in ("counts", "end"):
                progress.update(data.get("counts") or {})

        follow(client, run["id"], on_event)


def all_succeeded(run: dict[str, Any]) -> bool:
    targets = run.get("targets") or []
    if targets:
        return all(target.get("status") == "succeeded" for target in targets)
    return run.get("status") == "succeeded"
