from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from .validators import validate_agent_dir, validate_host, validate_ssh_user


class Server(models.Model):
    """A managed host. Its agent registers with the server token, which is shown once and
    stored only as a hash."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="servers"
    )
    name = models.CharField(max_length=200)
    host = models.CharField(max_length=255, validators=[validate_host])
    ssh_user = models.CharField(max_length=64, default="root", validators=[validate_ssh_user])
    ssh_port = models.PositiveIntegerField(
        default=22, validators=[MinValueValidator(1), MaxValueValidator(65535)]
    )
    ssh_private_key_encrypted = models.TextField(blank=True, default="")
    # known_hosts lines recorded the first time Tether reached the host over SSH; a host that
    # later shows another key is refused until an operator forgets the recorded one.
    ssh_known_hosts = models.TextField(blank=True, default="")
    agent_dir = models.CharField(
        max_length=255, default="/opt/tether-agent", validators=[validate_agent_dir]
    )
    tags = models.JSONField(default=list, blank=True)
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="server_name_unique_per_owner")
        ]

    def __str__(self) -> str:
        return self.name


class Agent(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        ONLINE = "online"
        OFFLINE = "offline"
        STOPPED = "stopped"
        UPGRADING = "upgrading"

    server = models.ForeignKey(Server, on_delete=models.CASCADE, related_name="agents")
    hostname = models.CharField(max_length=255)
    # Who the agent is (DESIGN §6): Tether's agent sends a machine identity (derived from
    # /etc/machine-id and its state dir) and the id of its install (its state dir's own);
    # agents of the original dialect send neither and are known by their hostname.
    machine_id = models.CharField(max_length=64, blank=True, default="")
    instance_id = models.CharField(max_length=64, blank=True, default="")
    version = models.CharField(max_length=64, blank=True, default="")
    os = models.CharField(max_length=64, blank=True, default="")
    arch = models.CharField(max_length=64, blank=True, default="")
    rpc_port = models.PositiveIntegerField(null=True, blank=True)
    # Where the agent's requests last came from: where the server reaches its RPC endpoint.
    address = models.GenericIPAddressField(null=True, blank=True)
    # Whether the server verifies the agent's RPC certificate, and the agent the server's.
    verify_ssl = models.BooleanField(default=True)
    tags = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    last_heartbeat = models.DateTimeField(null=True, blank=True, db_index=True)
    # Credentials: the token as a SHA-256 hash (it is a lookup key), the secret key encrypted
    # (the server needs it back to check signatures). A dump yields neither.
    token_hash = models.CharField(max_length=64, unique=True)
    secret_key_encrypted = models.TextField()
    # Fixed at registration: an agent that declared signing must sign every request.
    signs_requests = models.BooleanField(default=False)
    # Set by its first request with a nonce: from then on a request without one is refused
    # (an agent upgraded in place keeps its credentials, so this cannot wait for a
    # registration).
    sends_nonces = models.BooleanField(default=False)
    registered_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["hostname", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["server", "machine_id"],
                condition=~models.Q(machine_id=""),
                name="agent_unique_per_machine",
            ),
            models.UniqueConstraint(
                fields=["server", "hostname"],
                condition=models.Q(machine_id=""),
                name="agent_unique_per_host",
            ),
        ]
        # Lists are read a page at a time in this order (the API, the fleet page and its
        # poll): the database walks the first rows of the index instead of sorting the fleet.
        indexes = [models.Index(fields=["hostname", "id"], name="agent_hostname")]

    def __str__(self) -> str:
        return self.hostname

    @property
    def legacy(self) -> bool:
        return not self.signs_requests


class AgentNonce(models.Model):
    """A signed request's nonce, kept until its window ends (fleet.nonces): shared by the
    processes that serve one fleet on PostgreSQL. No foreign key: a row outlives nothing it
    needs, and the insert stays one cheap statement."""

    pk = models.CompositePrimaryKey("agent_id", "nonce")
    agent_id = models.BigIntegerField()
    nonce = models.CharField(max_length=64)
    expires = models.BigIntegerField(db_index=True)  # Unix seconds

    def __str__(self) -> str:
        return f"{self.agent_id}:{self.nonce}"
