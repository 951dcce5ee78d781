"""Small display helpers for the pages."""

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django import template
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from tether.fleet.services import offline_after

register = template.Library()


@register.filter
def ago(moment: datetime | None) -> str:
    """'3 s ago', '5 min ago', '2 h ago', '4 d ago'; 'never' for no moment."""
    if moment is None:
        return "never"
    seconds = max(0, int((timezone.now() - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


@register.filter
def duration(command: object) -> str:
    """How long a command ran, from its start (or creation) to its end; '' if unfinished."""
    start = getattr(command, "started_at", None) or getattr(command, "created_at", None)
    end = getattr(command, "finished_at", None)
    if start is None or end is None:
        return ""
    return f"{(end - start).total_seconds():.1f} s"


SUMMARY_ORDER = [
    "succeeded",
    "failed",
    "timed_out",
    "lost",
    "expired",
    "cancelled",
    "skipped",
    "running",
    "queued",
]


@register.filter
def count_summary(counts: dict[str, int]) -> str:
    """A run's counts in a line: '5 targets: 3 succeeded, 1 failed, 1 running'."""
    parts = [f"{counts[name]} {name}" for name in SUMMARY_ORDER if counts.get(name)]
    total = counts.get("total", 0)
    head = f"{total} target{'' if total == 1 else 's'}"
    return f"{head}: {', '.join(parts)}" if parts else head


@register.simple_tag
def fleet_rows(agents: Iterable[Any]) -> str:
    """The fleet table's rows, from the fleet page's row tuples (fleet_views.LISTED and
    `server_name`). Built in Python, not with the template language: a template loop over a
    page of agents is most of the fragment's CPU (bench/fleet_page.py). format_html escapes
    every value."""
    link = reverse("web:agent", args=[0])[: -len("0/")]
    online = f"within {seconds_text(offline_after())}"
    rows = []
    for agent in agents:
        tags = format_html_join("", '<span class="tag">{}</span>', ((t,) for t in agent.tags or []))
        rows.append(
            format_html(
                '<tr data-agent="{pk}"><td data-label="Hostname"><a href="{link}{pk}/">{host}</a>'
                '</td><td data-label="Server">{server}</td><td data-label="Status"><span '
                'class="badge status-{status}">{status}</span></td><td data-label="Version">'
                '{version}</td><td data-label="Heartbeat">{beat}</td>'
                '<td data-label="Tags">{tags}</td></tr>',
                pk=agent.id,
                link=link,
                host=agent.hostname,
                server=agent.server_name,
                status=agent.status,
                version=agent.version or "\u2013",
                beat=online if agent.status == "online" else heartbeat(agent.last_heartbeat),
                tags=tags,
            )
        )
    return mark_safe("".join(rows))  # noqa: S308 (each row is format_html output)


def heartbeat(moment: datetime | None) -> str:
    """A last heartbeat as "5 min ago", in a <time> the page's script keeps moving on (the
    row is not redrawn while it stays the same)."""
    if moment is None:
        return "never"
    return format_html(
        '<time datetime="{}" title="{}" data-ago>{}</time>',
        moment.isoformat(),
        moment.strftime("%Y-%m-%d %H:%M:%S %Z"),
        ago(moment),
    )


def seconds_text(seconds: float) -> str:
    """90 -> "90 s", 300 -> "5 min", 1.5 -> "1.5 s"."""
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
