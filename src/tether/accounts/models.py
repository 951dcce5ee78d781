from datetime import datetime

from django.conf import settings
from django.db import models
from django.utils import timezone


class AuditEvent(models.Model):
    """Who did what to which object, and when: every human action that changes the fleet."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=32)
    target_id = models.CharField(max_length=64)
    details = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)
    # Where from (tether.accounts.origin): the peer as the throttles see it, and what the
    # client said it was (cut to its first 256 characters). Empty outside a request.
    address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=256, blank=True, default="")

    class Meta:
        ordering = ["-at", "-id"]
        # GET /api/audit/ reads newest first, by actor, action or target: each filter walks
        # its own index backwards, in that order, instead of sorting what matched (measured
        # at 1,000,000 events: docs/audit.md).
        indexes = [
            models.Index(fields=["user", "at", "id"], name="audit_user_at"),
            models.Index(fields=["action", "at", "id"], name="audit_action_at"),
            models.Index(fields=["target_type", "at", "id"], name="audit_type_at"),
            models.Index(fields=["target_type", "target_id", "at", "id"], name="audit_target_at"),
        ]

    def __str__(self) -> str:
        return f"{self.user} {self.action} {self.target_type}:{self.target_id}"


class ApiToken(models.Model):
    """A person's API token (DESIGN §6): only its SHA-256 is stored, so a database dump
    yields no usable token; the prefix lets its owner tell tokens apart in a list. A revoked
    token keeps its row (the audit log points at it) but no longer authenticates."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16)
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)  # null: never, asked for explicitly
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.user} {self.name} ({self.prefix}…)"

    def is_usable(self, now: datetime) -> bool:
        """Not revoked, not expired, and its user may still log in."""
        if self.revoked_at is not None or not self.user.is_active:
            return False
        return self.expires_at is None or now < self.expires_at
