from django.db import models

from tether.fleet.models import Agent


class Certificate(models.Model):
    """A certificate the built-in CA issued. The table is the revocation list: the server
    refuses an agent presenting a serial marked revoked here."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="certificates")
    serial = models.CharField(max_length=40, unique=True)  # hex
    fingerprint_sha256 = models.CharField(max_length=64)
    not_before = models.DateTimeField()
    not_after = models.DateTimeField(db_index=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # When the agent reported it installed (its update_certificate command succeeded).
    installed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.serial} (agent {self.agent_id})"
