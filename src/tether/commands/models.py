from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from tether.fleet.models import Agent

# The longest `expires_in` an operator may give a command or a run.
MAX_EXPIRES_IN = 365 * 86400


def expiry_from(moment: datetime, expires_in: int | None = None) -> datetime | None:
    """When a command that enters the queue at `moment` expires if no agent takes it: after
    its own `expires_in`, else TETHER_COMMAND_EXPIRE (None when that is 0: it waits for its
    agent forever)."""
    seconds = expires_in if expires_in is not None else settings.COMMAND_EXPIRE
    if seconds <= 0:
        return None
    return moment + timedelta(seconds=seconds)


class Command(models.Model):
    """One command for one agent. The row is the queue entry: a command exists only here,
    never only in memory (DESIGN §3)."""

    class Status(models.TextChoices):
        # A run's target waiting for its concurrency window: not handed to the agent yet.
        HELD = "held"
        QUEUED = "queued"
        DELIVERED = "delivered"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        TIMED_OUT = "timed_out"
        CANCELLED = "cancelled"
        LOST = "lost"
        # A run's target whose agent was offline when the run started (`offline: skip`).
        SKIPPED = "skipped"
        # Queued for longer than COMMAND_EXPIRE: its agent never came for it.
        EXPIRED = "expired"

    class Kind(models.TextChoices):
        SHELL = "shell"
        INTERNAL = "internal"

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="commands")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.SHELL)
    command = models.TextField()
    # None: run `command` with `bash -c`; a list: run [command, *args] without a shell.
    args = models.JSONField(null=True, blank=True)
    timeout = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    exit_code = models.IntegerField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    # Logical end of each stream: every byte before it has been received (stored, or dropped
    # past the output cap). A chunk may only start at or before this offset.
    stdout_end = models.BigIntegerField(default=0)
    stderr_end = models.BigIntegerField(default=0)
    stored_bytes = models.BigIntegerField(default=0)
    # Bytes of each stream dropped between its head and its tail (output.apply_chunks).
    stdout_dropped = models.BigIntegerField(default=0)
    stderr_dropped = models.BigIntegerField(default=0)
    # Output was dropped: by the server (the counts above) or by the agent before sending.
    truncated = models.BooleanField(default=False)
    cancel_requested = models.BooleanField(default=False)
    # When the agent was last told to cancel: told again every CANCEL_RESEND seconds, so a
    # pending cancel wakes the long-poll once, not on every poll.
    cancel_sent_at = models.DateTimeField(null=True, blank=True)
    # Set when the agent starts the command (start + timeout + lease + grace): past it, a
    # running command whose agent never reported is lost (see mark_lost_commands).
    report_deadline = models.DateTimeField(null=True, blank=True)
    delivery_count = models.PositiveIntegerField(default=0)
    # What an internal command carries beyond its name (a certificate and its key), as
    # encrypted JSON: a database dump does not yield the key.
    payload_encrypted = models.TextField(blank=True, default="")
    # A command sent to many agents at once belongs to its run (runs.py).
    run = models.ForeignKey(
        "commands.Run", null=True, blank=True, on_delete=models.CASCADE, related_name="commands"
    )
    # An internal command carrying out a deployment (upgrade, stop) reports into it.
    deployment = models.ForeignKey(
        "deploy.Deployment", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Set when the command enters the queue (a run's target: when it is released): still
    # queued past it, the sweep ends it `expired`. None: it waits for its agent forever.
    expires_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["agent", "status"], name="command_agent_status"),
            models.Index(fields=["run", "status"], name="command_run_status"),
            # The poll hub's query: agents with work, without reading finished commands.
            models.Index(fields=["status", "agent"], name="command_status_agent"),
            # An agent's history, newest first, read from the index instead of sorting all of
            # the agent's commands (15 ms at 5,000 commands, for every history read).
            models.Index(fields=["agent", "created_at", "id"], name="command_agent_latest"),
            # The expiry sweep's query reads only the queued commands past their expiry, in
            # order, however many have ever run. (A partial index on queued rows would be
            # smaller, but SQLite's planner does not pick it for a bound `status = ?`.)
            models.Index(fields=["status", "expires_at"], name="command_status_expiry"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.command[:40]}"


class OutputChunk(models.Model):
    """A stretch of one stream's bytes starting at `offset`; chunks of a stream never overlap,
    so each byte is stored once."""

    class Stream(models.TextChoices):
        STDOUT = "stdout"
        STDERR = "stderr"

    command = models.ForeignKey(Command, on_delete=models.CASCADE, related_name="chunks")
    stream = models.CharField(max_length=6, choices=Stream.choices)
    offset = models.BigIntegerField()
    data = models.BinaryField()

    class Meta:
        ordering = ["offset"]
        constraints = [
            models.UniqueConstraint(
                fields=["command", "stream", "offset"], name="chunk_unique_offset"
            )
        ]

    def __str__(self) -> str:
        return f"{self.command_id}:{self.stream}@{self.offset}"


class CommandTemplate(models.Model):
    """A reusable command line with typed `{param}` placeholders, shell-quoted on use."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="command_templates"
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    command = models.TextField()
    parameters = models.JSONField(default=list, blank=True)
    timeout = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="template_name_unique")
        ]

    def __str__(self) -> str:
        return self.name


class Run(models.Model):
    """One command sent to many agents (docs/runs.md): its targets are its commands, released
    to their agents as `max_concurrency` allows; past `max_errors` failures the targets not
    yet started are cancelled."""

    class Status(models.TextChoices):
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Offline(models.TextChoices):
        SKIP = "skip"
        WAIT = "wait"

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="runs"
    )
    command = models.TextField()
    args = models.JSONField(null=True, blank=True)
    template = models.ForeignKey(
        CommandTemplate, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    timeout = models.PositiveIntegerField()
    max_concurrency = models.PositiveIntegerField()
    # How many targets it started with: an agent deleted mid-run takes its target with it,
    # and the run must not then read as all-succeeded.
    targets_total = models.PositiveIntegerField(default=0)
    # None: every target runs, however many fail.
    max_errors = models.PositiveIntegerField(null=True, blank=True)
    offline = models.CharField(max_length=8, choices=Offline.choices, default=Offline.SKIP)
    # Seconds each target may wait in the queue once released (None: TETHER_COMMAND_EXPIRE).
    expires_in = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    # Why the run ended early (max_errors, an operator's cancel); blank otherwise.
    reason = models.TextField(blank=True, default="")
    cancel_requested = models.BooleanField(default=False)
    # A retried POST with the same key returns this run; the hash tells a different request.
    idempotency_key = models.CharField(max_length=200, blank=True, default="")
    request_hash = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["created_by", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="run_idempotency_key_per_user",
            )
        ]

    def __str__(self) -> str:
        return f"run #{self.pk} {self.command[:40]}"
