"""The ownership rule, once: staff see everything, others what they own. Each app's
`selectors.py` applies it to its own models, naming the path from the model to its owner."""

from datetime import datetime
from typing import TypeVar

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.db.models import Model, Q, QuerySet

from .models import ApiToken, AuditEvent

M = TypeVar("M", bound=Model)


def owned_by(user: AbstractBaseUser, queryset: QuerySet[M], owner: str) -> QuerySet[M]:
    """`queryset` as `user` may see it: all of it for staff, else the rows whose `owner` path
    (e.g. "agent__server__owner") is the user. Another user's object is then simply not
    found (a 404), never a 403 that would confirm it exists."""
    return queryset if user.is_staff else queryset.filter(**{owner: user})


def api_tokens_of(user: AbstractBaseUser) -> QuerySet[ApiToken]:
    """The tokens `user` may list and revoke: their own, not revoked (expired ones stay
    listed, so that their owner sees why a script stopped working). Staff too see only
    their own: a token is a personal credential, not a fleet object."""
    return ApiToken.objects.filter(user=user, revoked_at__isnull=True)


def audit_events_visible_to(user: AbstractBaseUser) -> QuerySet[AuditEvent]:
    """The audit log as `user` may read it, newest first: all of it for staff, else the
    events they are the actor of (what others did to their objects is others' record)."""
    return owned_by(user, AuditEvent.objects.select_related("user"), "user").order_by("-at", "-id")


def filter_audit_events(
    events: QuerySet[AuditEvent],
    *,
    actor: str = "",
    action: str = "",
    target_type: str = "",
    target_id: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[AuditEvent]:
    """Narrow the log: an actor by username, an action exactly or by a prefix ending in a
    dot (`agent.`), a target by type and optionally id, a time range (since inclusive,
    until exclusive). Each uses an index that also gives the order (AuditEvent.Meta)."""
    if actor:
        events = events.filter(user__username=actor)
    if action.endswith("."):
        events = events.filter(_action_prefix(action))
    elif action:
        events = events.filter(action=action)
    if target_type:
        events = events.filter(target_type=target_type)
    if target_id:
        events = events.filter(target_id=target_id)
    if since is not None:
        events = events.filter(at__gte=since)
    if until is not None:
        events = events.filter(at__lt=until)
    return events


def _action_prefix(prefix: str) -> Q:
    """Actions that start with `prefix` (which ends in a dot), as a condition an index can
    answer. SQLite's LIKE ignores case and so cannot use the index, but its text order is
    by code point: the prefix is the range up to the dot's successor. PostgreSQL's order
    follows a collation that may skip punctuation, so there it is a LIKE, on the index
    built for patterns."""
    if connection.vendor == "sqlite":
        return Q(action__gte=prefix, action__lt=prefix[:-1] + chr(ord(prefix[-1]) + 1))
    return Q(action__startswith=prefix)
