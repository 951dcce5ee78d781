from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from .models import ApiToken, AuditEvent
from .origin import current_origin
from .tokens import hash_api_token, new_api_token, token_prefix


def audit(*, user: AbstractBaseUser | None, action: str, target: Any, **details: Any) -> None:
    """Record a human action in the audit log (DESIGN §6); call it inside the action's
    transaction so the record and the change land together. Where from is the request being
    served (tether.accounts.origin), so no service has to pass it along."""
    origin = current_origin()
    AuditEvent.objects.create(
        user=user if user is not None and user.is_authenticated else None,
        action=action,
        target_type=type(target).__name__.lower(),
        target_id=str(getattr(target, "pk", target)),
        details=details,
        address=origin.address if origin else None,
        user_agent=origin.user_agent if origin else "",
    )


def default_token_days() -> int | None:
    """How long a token lives when its creator does not say: TETHER_TOKEN_DAYS (0: never)."""
    return settings.TOKEN_DAYS or None


def create_api_token(
    *, user: AbstractBaseUser, name: str, expires_in_days: int | None
) -> tuple[ApiToken, str]:
    """A new token for `user`, and its secret: the one time it exists in clear, for the
    caller to show once. `expires_in_days=None` makes a token that never expires."""
    secret = new_api_token()
    now = timezone.now()
    expires_at = None if expires_in_days is None else now + timedelta(days=expires_in_days)
    with transaction.atomic():
        token = ApiToken.objects.create(
            user=user,
            name=name,
            prefix=token_prefix(secret),
            token_hash=hash_api_token(secret),
            created_at=now,
            expires_at=expires_at,
        )
        audit(
            user=user,
            action="token.create",
            target=token,
            name=name,
            prefix=token.prefix,
            expires_at=expires_at.isoformat() if expires_at else None,
        )
    return token, secret


def revoke_api_token(*, token: ApiToken, user: AbstractBaseUser) -> None:
    """The token stops authenticating at once; its row stays for the audit log."""
    with transaction.atomic():
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit(user=user, action="token.revoke", target=token, name=token.name, prefix=token.prefix)
