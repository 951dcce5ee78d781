"""Small display helpers for the pages."""

from datetime import datetime

from django import template
from django.utils import timezone

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
