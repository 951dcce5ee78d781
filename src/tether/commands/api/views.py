"""Human API for commands and command templates."""

from django.db.models import QuerySet
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from tether.accounts.selectors import commands_visible_to, templates_visible_to

from .. import services
from ..models import Command, CommandTemplate
from .serializers import CommandSerializer, CommandTemplateSerializer


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
