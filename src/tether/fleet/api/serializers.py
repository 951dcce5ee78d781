from rest_framework import serializers

from tether.serializers import StrictInputMixin, TagList

from ..models import Agent, Server
from ..selectors import server_name_taken
from ..validators import NAME_TAKEN


class ServerSerializer(StrictInputMixin, serializers.ModelSerializer):
    ssh_private_key = serializers.CharField(
        write_only=True, required=False, allow_blank=True, max_length=16384, trim_whitespace=False
    )
    tags = TagList()
    agents = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
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
        # The field rules (host, ssh_user, ssh_port, agent_dir) are the model's validators.
        owner = self.instance.owner if self.instance else self.context["request"].user
        if server_name_taken(owner=owner, name=value, server=self.instance):
            raise serializers.ValidationError(NAME_TAKEN)
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
