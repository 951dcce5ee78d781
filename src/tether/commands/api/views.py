"""Human API for commands and command templates, and the command actions on an agent
(`/api/agents/{id}/send_command/`, `/api/agents/{id}/commands/`)."""

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from tether.fleet.api.views import AgentActionViewSet

from .. import services
from ..models import Command, CommandTemplate
from ..selectors import command_history, commands_visible_to, templates_visible_to
from .serializers import (
    CommandSerializer,
    CommandSummarySerializer,
    CommandTemplateSerializer,
    SendCommandInput,
)


class AgentCommandViewSet(AgentActionViewSet):
    """Commands for one agent."""

    serializer_class = CommandSerializer

    @extend_schema(request=SendCommandInput, responses={201: CommandSerializer})
    @action(detail=True, methods=["post"])
    def send_command(self, request: Request, pk: str) -> Response:
        """Queue a command (a line, an argv, or a template with parameters) for this agent."""
        agent = self.get_object()
        data = SendCommandInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        if "template" in values:
            template = templates_visible_to(request.user).filter(pk=values["template"]).first()
            if template is None:
                raise exceptions.ValidationError({"template": ["No such template."]})
            values["template"] = template
        command = services.send_command(agent=agent, user=request.user, **values)
        return Response(CommandSerializer(command).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        operation_id="agents_commands_retrieve",
        responses={200: CommandSummarySerializer(many=True)},
    )
    @action(detail=True, methods=["get"], pagination_class=None)
    def commands(self, request: Request, pk: str) -> Response:
        """The agent's latest commands, newest first."""
        latest = command_history(self.get_object())
        return Response(CommandSummarySerializer(latest, many=True).data)


class CommandViewSet(mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = CommandSerializer
    lookup_value_regex = r"\d+"

    def get_queryset(self) -> QuerySet[Command]:
        return commands_visible_to(self.request.user)

    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        """Cancel: at once when queued; a delivered or running command is killed by its
        agent, which hears of it within one long-poll wake-up. Finished: 409."""
        command = services.cancel_command(command=self.get_object(), user=request.user)
        return Response(CommandSerializer(command).data, status=202)


class CommandTemplateViewSet(viewsets.ModelViewSet):
    serializer_class = CommandTemplateSerializer
    lookup_value_regex = r"\d+"

    def get_queryset(self) -> QuerySet[CommandTemplate]:
        return templates_visible_to(self.request.user)

    def perform_create(self, serializer: CommandTemplateSerializer) -> None:
        template = CommandTemplate(owner=self.request.user, **serializer.validated_data)
        serializer.instance = services.save_template(template=template, user=self.request.user)

    def perform_update(self, serializer: CommandTemplateSerializer) -> None:
        template = serializer.instance
        for name, value in serializer.validated_data.items():
            setattr(template, name, value)
        services.save_template(template=template, user=self.request.user)

    def perform_destroy(self, instance: CommandTemplate) -> None:
        services.delete_template(template=instance, user=self.request.user)
