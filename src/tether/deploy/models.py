from django.conf import settings
from django.db import models
from django.utils import timezone

from tether.fleet.models import Agent, Server


class Deployment(models.Model):
    """An install, upgrade, stop or start of an agent, with the live log operators watch."""

    class Kind(models.TextChoices):
        INSTALL = "install"
        UPGRADE = "upgrade"
        STOP = "stop"
        START = "start"

    class Method(models.TextChoices):
        AGENT = "agent"
        SSH = "ssh"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    server = models.ForeignKey(Server, on_delete=models.CASCADE, related_name="deployments")
    # None for an install on a host that has no agent yet.
    agent = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.CASCADE, related_name="deployments"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    method = models.CharField(max_length=8, choices=Method.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    target_version = models.CharField(max_length=64, blank=True, default="")
    log = models.TextField(blank=True, default="")
    log_truncated = models.BooleanField(default=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The URL the agent is given to reach this server (TETHER_PUBLIC_URL, else the request's).
    server_url = models.CharField(max_length=500, blank=True, default="")
    # Past it, a deployment still waiting for its agent fails (see services.expire_deployments).
    deadline = models.DateTimeField(null=True, blank=True)
    # A deployment started by a rolling upgrade (rollouts.py) belongs to it.
    rollout = models.ForeignKey(
        "deploy.Rollout",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="deployments",
    )
    # A one-time registration token for the agent an SSH run starts, kept only as a hash and
    # accepted only while the deployment is active (the server token itself is never stored).
    enroll_token_hash = models.CharField(max_length=64, blank=True, default="", db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["agent", "status"], name="deployment_agent_status")]
        constraints = [
            # The database, not only the view, keeps two lifecycle actions off one agent.
            models.UniqueConstraint(
                fields=["agent"],
                condition=models.Q(status__in=["queued", "running"]),
                name="one_active_deployment_per_agent",
            ),
            models.UniqueConstraint(
                fields=["server"],
                condition=models.Q(kind="install", status__in=["queued", "running"]),
                name="one_active_install_per_server",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.kind} via {self.method}"


class Rollout(models.Model):
    """A rolling upgrade: many agents upgraded in waves of `batch_size`; a wave starts when
    the one before it has ended, and past `max_errors` failed upgrades no further wave starts
    (a canary rollout: the first wave is the canary)."""

    class Status(models.TextChoices):
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="rollouts"
    )
    batch_size = models.PositiveIntegerField()
    max_errors = models.PositiveIntegerField(default=0)
    target_version = models.CharField(max_length=64, blank=True, default="")
    # Agents not yet in a wave, in the order they will go; emptied when the rollout stops.
    pending = models.JSONField(default=list, blank=True)
    not_started = models.JSONField(default=list, blank=True)
    wave = models.PositiveIntegerField(default=0)
    server_url = models.CharField(max_length=500, blank=True, default="")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"rollout #{self.pk} to {self.target_version}"
