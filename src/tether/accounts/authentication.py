"""The one authentication class for people's API tokens: `Authorization: Token <key>` (or
`Bearer <key>`)."""

from datetime import datetime, timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q
from django.http import HttpRequest
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header

from .models import ApiToken
from .tokens import MAX_LENGTH, hash_api_token

KEYWORDS = (b"token", b"bearer")
REFUSAL = "Invalid token."
# last_used_at is news to a person, not an access log: written at most this often per token,
# so that a script calling the API in a loop costs no write per request.
LAST_USED_EVERY = timedelta(minutes=1)


class ApiTokenAuthentication(BaseAuthentication):
    """Resolves a human API token to its user (`request.auth` is the ApiToken). Unknown,
    malformed, expired and revoked tokens, and tokens of inactive users, all get the same
    401, so the answer tells nothing about which tokens exist."""

    def authenticate(self, request: HttpRequest) -> tuple[AbstractBaseUser, ApiToken] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() not in KEYWORDS:
            return None  # not ours: another class (or none) decides
        if len(parts) != 2 or len(parts[1]) > MAX_LENGTH:
            raise exceptions.AuthenticationFailed(REFUSAL)
        try:
            key = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed(REFUSAL) from None
        token = (
            ApiToken.objects.select_related("user").filter(token_hash=hash_api_token(key)).first()
        )
        now = timezone.now()
        if token is None or not token.is_usable(now):
            raise exceptions.AuthenticationFailed(REFUSAL)
        touch(token, now)
        return token.user, token

    def authenticate_header(self, request: HttpRequest) -> str:
        return "Token"


def touch(token: ApiToken, now: datetime) -> None:
    """Record that the token was used, at most once per LAST_USED_EVERY: the condition is in
    the UPDATE, so processes racing on one token write it once between them."""
    if token.last_used_at is not None and now - token.last_used_at < LAST_USED_EVERY:
        return
    stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_EVERY)
    ApiToken.objects.filter(stale, pk=token.pk).update(last_used_at=now)
    token.last_used_at = now
