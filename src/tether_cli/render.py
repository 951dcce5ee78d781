"""What tetherctl shows: Rich tables on stdout, notes and errors on stderr, a run's live output
prefixed by host, its progress bar and its summary. Output read from a host is never parsed
as Rich markup; piped, it is written as it came (no colours, no wrapping, tabs kept)."""

import json
import sys
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

STATUS_STYLES = {
    "online": "green",
    "succeeded": "green",
    "offline": "red",
    "failed": "red",
    "timed_out": "red",
    "lost": "red",
    "expired": "red",
    "pending": "yellow",
    "upgrading": "yellow",
    "queued": "yellow",
    "running": "yellow",
    "skipped": "dim",
    "stopped": "dim",
    "cancelled": "dim",
}
COUNT_ORDER = [
    "succeeded",
    "failed",
    "timed_out",
    "lost",
    "expired",
    "skipped",
    "cancelled",
    "running",
    "queued",
]


def error(message: str) -> None:
    """The one line a refusal gets: `tetherctl: <message>` on stderr."""
    _write(err, Text.assemble(("tetherctl: ", "bold red"), message))


def note(message: str) -> None:
    _write(err, Text(message, style="dim"))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def _write(console: Console, text: Text) -> None:
    """A line as it came: styled on a terminal, plain text (tabs and all) when piped."""
    if console.is_terminal:
        console.print(text, soft_wrap=True, markup=False, highlight=False)
    else:
        console.file.write(text.plain + "\n")
        console.file.flush()


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def age(timestamp: str | None) -> str:
    """`12s ago`, `5m ago`, `3h ago`, `2d ago`, or `never`."""
    if not timestamp:
        return "never"
    try:
        then = datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0, int((datetime.now(UTC) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def agents_table(agents: list[dict[str, Any]]) -> None:
    table = Table(title=f"{len(agents)} agents", title_justify="left")
    for column in ("id", "hostname", "server", "status", "version", "last heartbeat", "tags"):
        table.add_column(column, overflow="fold", justify="right" if column == "id" else "left")
    for agent in agents:
        table.add_row(
            str(agent["id"]),
            agent.get("hostname", ""),
            agent.get("server_name", ""),
            status_text(agent.get("status", "")),
            agent.get("version") or "",
            age(agent.get("last_heartbeat")),
            ", ".join(agent.get("tags") or []),
        )
    out.print(table)


def templates_table(templates: list[dict[str, Any]]) -> None:
    table = Table(title=f"{len(templates)} command templates", title_justify="left")
    for column in ("id", "name", "command", "parameters", "timeout", "description"):
        table.add_column(column, overflow="fold", justify="right" if column == "id" else "left")
    for template in templates:
        parameters = ", ".join(
            f"{p['name']}:{p.get('type', 'string')}" + ("" if p.get("required") else "?")
            for p in template.get("parameters") or []
        )
        timeout = template.get("timeout")
        table.add_row(
            str(template["id"]),
            template.get("name", ""),
            Text(template.get("command", "")),
            parameters,
            f"{timeout}s" if timeout else "",
            Text(template.get("description", "")),
        )
    out.print(table)


def tokens_table(tokens: list[dict[str, Any]]) -> None:
    table = Table(title=f"{len(tokens)} API tokens", title_justify="left")
    for column in ("id", "name", "token", "created", "expires", "last used"):
        table.add_column(column, overflow="fold", justify="right" if column == "id" else "left")
    now = datetime.now(UTC)
    for token in tokens:
        expires = token.get("expires_at")
        if not expires:
            expires_text = Text("never")
        elif datetime.fromisoformat(expires) <= now:
            expires_text = Text(f"expired {expires[:10]}", style="red")
        else:
            expires_text = Text(expires[:10])
        table.add_row(
            str(token["id"]),
            Text(token.get("name", "")),
            f"{token.get('prefix', '')}…",
            (token.get("created_at") or "")[:10],
            expires_text,
            age(token.get("last_used_at")),
        )
    out.print(table)


def status_check(agent: dict[str, Any], answer: dict[str, Any]) -> None:
    reachable = bool(answer.get("reachable"))
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("agent", f"{agent['hostname']} (id {agent['id']}, {agent.get('server_name')})")
    table.add_row("reachable", Text("yes", "green") if reachable else Text("no", "red"))
    table.add_row("status", status_text(answer.get("status", "")))
    table.add_row("version", answer.get("version") or "unknown")
    latency = answer.get("latency_ms")
    table.add_row("latency", f"{latency:.0f} ms" if isinstance(latency, int | float) else "")
    running = answer.get("running") or []
    table.add_row("running", ", ".join(str(c) for c in running) if running else "nothing")
    if answer.get("error"):
        table.add_row("error", Text(answer["error"], style="red"))
    out.print(table)


def upgrade_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="upgrade", title_justify="left")
    for column in ("id", "hostname", "server", "result", "deployment", "method"):
        table.add_column(column, overflow="fold", justify="right" if column == "id" else "left")
    for row in rows:
        agent = row["agent"]
        refused = row.get("error")
        table.add_row(
            str(agent["id"]),
            agent.get("hostname", ""),
            agent.get("server_name", ""),
            Text(f"refused: {refused}", "red") if refused else Text("started", "green"),
            str(row.get("deployment_id") or ""),
            row.get("method") or "",
        )
    out.print(table)


class RunOutput:
    """A run's output, one line at a time, each prefixed by its host: `web-1 | line` on
    stdout for the command's stdout, `web-1 ! line` on stderr (red on a terminal) for its
    stderr. Labels are padded to one width so the output lines up."""

    def __init__(self, labels: dict[int, str]) -> None:
        self.labels = labels
        self.width = max((len(label) for label in labels.values()), default=0)
        # While a progress bar is drawn on the terminal, lines bound for the same terminal go
        # through its console, so that they print above the bar instead of across it.
        self.above_bar: Console | None = None

    def label(self, agent: int, hostname: str) -> str:
        label = self.labels.get(agent) or hostname or f"agent {agent}"
        self.width = max(self.width, len(label))
        return label

    def line(self, agent: int, hostname: str, stream: str, text: str) -> None:
        label = self.label(agent, hostname).ljust(self.width)
        if stream == "stderr":
            _write(err, Text.assemble((label, "bold"), (" ! ", "red"), (text, "red")))
        else:
            to_terminal = self.above_bar if self.above_bar and out.is_terminal else out
            _write(to_terminal, Text.assemble((label, "cyan"), " | ", text))


class RunProgress:
    """A done/total bar on stderr while a run goes on, when `shown` (and stderr is a
    terminal); otherwise nothing. `RunOutput.above_bar` prints host output above it."""

    def __init__(self, total: int, shown: bool) -> None:
        self.total = total
        self.bar: Progress | None = None
        if shown:
            self.bar = Progress(
                TextColumn("[bold]run"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("done"),
                TimeElapsedColumn(),
                console=err,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.task = self.bar.add_task("run", total=total)

    def __enter__(self) -> "RunProgress":
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    def update(self, counts: dict[str, Any]) -> None:
        """Targets done: neither waiting nor running."""
        if self.bar:
            total = counts.get("total", self.total)
            done = total - counts.get("queued", 0) - counts.get("running", 0)
            self.bar.update(self.task, completed=done, total=total)


def run_summary(run: dict[str, Any], labels: dict[int, str]) -> None:
    """One row per target (host, status, exit code, duration), then the counts."""
    table = Table(title=f"run {run['id']}: {run.get('status', '')}", title_justify="left")
    for column in ("host", "status", "exit code", "duration"):
        justify = "right" if column in ("exit code", "duration") else "left"
        table.add_column(column, overflow="fold", justify=justify)
    for target in run.get("targets") or []:
        exit_code, duration = target.get("exit_code"), target.get("duration")
        table.add_row(
            labels.get(target["agent"]) or target.get("hostname", ""),
            status_text(target.get("status", "")),
            "" if exit_code is None else str(exit_code),
            "" if duration is None else f"{duration:.2f}s",
        )
    out.print(table)
    counts = run.get("counts") or {}
    parts = [f"{counts[name]} {name}" for name in COUNT_ORDER if counts.get(name)]
    line = f"{counts.get('total', len(run.get('targets') or []))} targets: " + ", ".join(parts)
    out.print(Text(line, style="bold"))
    if run.get("reason"):
        out.print(Text(run["reason"], style="yellow"))
