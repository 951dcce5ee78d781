from typing import Any

from django.conf import settings
from rest_framework import serializers

from tether.serializers import StrictInputMixin

from .. import command_templates, output
from ..models import MAX_EXPIRES_IN, Command, CommandTemplate
from ..selectors import TEMPLATE_NAME_TAKEN, template_name_taken

MAX_COMMAND_CHARS = 64 * 1024


class CommandSummarySerializer(serializers.ModelSerializer):
    """A command without its output, for history lists."""

    created_by = serializers.CharField(source="created_by.username", default=None, read_only=True)

    class Meta:
        model = Command
        fields = [
            "id",
            "agent",
            "kind",
            "command",
            "args",
            "timeout",
            "status",
            "exit_code",
            "error",
            "truncated",
            "stdout_dropped",
            "stderr_dropped",
            "cancel_requested",
            "run",
            "created_by",
            "created_at",
            "delivered_at",
            "started_at",
            "finished_at",
            "expires_at",
        ]
        read_only_fields = fields


class CommandSerializer(CommandSummarySerializer):
    """A command as read (DESIGN §4): output decoded to text, with the dropped marker where
    the middle of a long stream was dropped."""

    stdout = serializers.SerializerMethodField()
    stderr = serializers.SerializerMethodField()

    class Meta(CommandSummarySerializer.Meta):
        fields = [*CommandSummarySerializer.Meta.fields, "stdout", "stderr", "delivery_count"]
        read_only_fields = fields

    def get_stdout(self, command: Command) -> str:
        return output.output_text(command, "stdout")

    def get_stderr(self, command: Command) -> str:
        return output.output_text(command, "stderr")


class CommandInput(StrictInputMixin, serializers.Serializer):
    """What to run: a line, an argv, or a template with its values (send_command and runs)."""

    command = serializers.CharField(
        max_length=MAX_COMMAND_CHARS, trim_whitespace=False, required=False
    )
    args = serializers.ListField(
        child=serializers.CharField(
            max_length=MAX_COMMAND_CHARS, trim_whitespace=False, allow_blank=True
        ),
        max_length=256,
        required=False,
        allow_null=True,
    )
    timeout = serializers.IntegerField(
        min_value=1, max_value=settings.COMMAND_TIMEOUT_MAX, required=False
    )
    template = serializers.IntegerField(required=False, min_value=1, max_value=2**62)
    params = serializers.DictField(required=False)
    # Seconds the command may wait in the queue for its agent (default TETHER_COMMAND_EXPIRE).
    expires_in = serializers.IntegerField(min_value=1, max_value=MAX_EXPIRES_IN, required=False)

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        if ("command" in data) == ("template" in data):
            raise serializers.ValidationError("Give either `command` or `template`.")
        if "template" in data and data.get("args"):
            raise serializers.ValidationError("`args` cannot be combined with a template.")
        if "params" in data and "template" not in data:
            raise serializers.ValidationError("`params` only go with a template.")
        if "command" in data and not data["command"].strip():
            raise serializers.ValidationError({"command": ["This field may not be blank."]})
        return data


class SendCommandInput(CommandInput):
    """`POST /api/agents/{id}/send_command/`."""


class CommandTemplateSerializer(StrictInputMixin, serializers.ModelSerializer):
    parameters = serializers.JSONField(required=False)
    command = serializers.CharField(max_length=MAX_COMMAND_CHARS, trim_whitespace=False)
    timeout = serializers.IntegerField(
        min_value=1, max_value=settings.COMMAND_TIMEOUT_MAX, required=False, allow_null=True
    )

    class Meta:
        model = CommandTemplate
        fields = [
            "id",
            "name",
            "description",
            "command",
            "parameters",
            "timeout",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]

    def validate_name(self, value: str) -> str:
        owner = self.context["request"].user
        if template_name_taken(owner=owner, name=value, template=self.instance):
            raise serializers.ValidationError(TEMPLATE_NAME_TAKEN)
        return value

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        command = data.get("command", getattr(self.instance, "command", ""))
        parameters = data.get("parameters", getattr(self.instance, "parameters", []))
        try:
            data["parameters"] = command_templates.validate_parameters(command, parameters)
        except command_templates.TemplateError as exc:
            raise serializers.ValidationError({"parameters": [str(exc)]}) from exc
        return data
