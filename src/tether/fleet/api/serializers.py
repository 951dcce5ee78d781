import re

from rest_framework import serializers

from tether.serializers import StrictInputMixin, TagList

from ..models import Agent, Server

AGENT_DIR = re.compile(r"/[A-Za-z0-9._/+-]{1,254}")
SSH_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


class ServerSerializer(StrictInputMixin, serializers.ModelSerializer):
    ssh_private_key = serializers.CharField(
        write_only=True, required=False, allow_blank=True, max_length=16384, trim_whitespace=False
    )
    tags = TagList()
    agents = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
    ssh_port = serializers.IntegerField(min_value=1, max_value=65535, required=False)
    has_ssh_key = serializers.SerializerMethodField()

    class Meta:
        model = Server
        fields = [
            "id",
            "name",
            "host",
            "ssh_port",
            "ssh_user",
            "ssh_private_key",
            "agent_dir",
            "ssh_known_hosts",
            "has_ssh_key",
            "tags",
            "agents",
            "created_at",
        ]
        read_only_fields = ["id", "ssh_known_hosts", "agents", "created_at"]

    def get_has_ssh_key(self, server: Server) -> bool:
        return bool(server.ssh_private_key_encrypted)

    def validate_name(self, value: str) -> str:
        owner = self.instance.owner if self.instance else self.context["request"].user
        taken = Server.objects.filter(owner=owner, name=value)
        if self.instance is not None:
            taken = taken.exclude(pk=self.instance.pk)
        if taken.exists():
            raise serializers.ValidationError("You already have a server with this name.")
        return value

    def validate_agent_dir(self, value: str) -> str:
        # It ends up in a systemd ExecStart line and in the agent's paths: a plain absolute path.
        if not AGENT_DIR.fullmatch(value) or "/../" in value + "/":
            raise serializers.ValidationError(
                "Enter an absolute path of letters, digits and . _ - + / only."
            )
        return value

    def validate_ssh_user(self, value: str) -> str:
        if not SSH_USER.fullmatch(value):
            raise serializers.ValidationError("Enter a user name (letters, digits, _ . -).")
        return value

    def validate_host(self, value: str) -> str:
        if any(c.isspace() for c in value) or value.startswith("-"):
            raise serializers.ValidationError("Enter a host name or address.")
        return value


class AgentSerializer(StrictInputMixin, serializers.ModelSerializer):
    server_name = serializers.CharField(source="server.name", read_only=True)
    legacy = serializers.BooleanField(read_only=True)
    tags = TagList()

    class Meta:
        model = Agent
        fields = [
            "id",
            "server",
            "server_name",
            "hostname",
            "status",
            "last_heartbeat",
            "version",
            "os",
            "arch",
            "rpc_port",
            "tags",
            "legacy",
            "registered_at",
        ]
        read_only_fields = [f for f in fields if f != "tags"]
