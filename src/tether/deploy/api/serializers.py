from rest_framework import serializers

from ..models import Deployment


class DeploymentSerializer(serializers.ModelSerializer):
    """A deployment as read (DESIGN §4)."""

    created_by = serializers.CharField(source="created_by.username", default=None, read_only=True)

    class Meta:
        model = Deployment
        fields = [
            "id",
            "agent",
            "server",
            "kind",
            "method",
            "status",
            "target_version",
            "log",
            "log_truncated",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class DeploymentSummarySerializer(DeploymentSerializer):
    """Without the log, for lists."""

    class Meta(DeploymentSerializer.Meta):
        fields = [f for f in DeploymentSerializer.Meta.fields if f != "log"]
        read_only_fields = fields
