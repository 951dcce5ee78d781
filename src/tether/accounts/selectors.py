"""The ownership rule, once: staff see everything, others what they own. Each app's
`selectors.py` applies it to its own models, naming the path from the model to its owner."""

from typing import TypeVar

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Model, QuerySet

from .models import ApiToken

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
