from typing import Any

from django.contrib.auth.models import AbstractBaseUser

from .models import AuditEvent


def audit(*, user: AbstractBaseUser | None, action: str, target: Any, **details: Any) -> None:
    """Record a human action in the audit log (DESIGN §6); call it inside the action's
    transaction so the record and the change land together."""
    AuditEvent.objects.create(
        user=user if user is not None and user.is_authenticated else None,
        action=action,
        target_type=type(target).__name__.lower(),
        target_id=str(getattr(target, "pk", target)),
        details=details,
    )
