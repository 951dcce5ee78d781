"""Human API for servers and agents. What is done *to* an agent lives with the app that does
it: commands (send_command, history), deploy (upgrade, stop, start, install), pki
(certificates, check_status)."""

from typing import Any

from django.db.models import QuerySet
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from .. import services
from ..models import Agent, Server
from ..selectors import AgentFilter, agents_visible_to, servers_visible_to
from .serializers import AgentSerializer, ServerSerializer


class AgentActionViewSet(viewsets.GenericViewSet):
    """Base of the actions other apps perform on one agent, routed under /api/agents/{id}/
    by their own urls.py: the agent is found among the user's own (another's is a 404)."""

    lookup_value_regex = r"\d+"

    def get_queryset(self) -> QuerySet[Agent]:
        return agents_visible_to(self.request.user)


class ServerActionViewSet(viewsets.GenericViewSet):
    """Base of the actions other apps perform on one server (/api/servers/{id}/...)."""

    lookup_value_regex = r"\d+"

    def get_queryset(self) -> QuerySet[Server]:
        return servers_visible_to(self.request.user)


class ServerViewSet(viewsets.ModelViewSet):
    serializer_class = ServerSerializer
    lookup_value_regex = r"\d+"

    def get_queryset(self) -> QuerySet[Server]:
        return servers_visible_to(self.request.user).prefetch_related("agents")

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = self.get_serializer(data=request.data)
        data.is_valid(raise_exception=True)
        server, token = services.create_server(owner=request.user, **data.validated_data)
        body = {**ServerSerializer(server, context={"request": request}).data}
        body["server_token"] = token
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_update(self, serializer: ServerSerializer) -> None:
        services.update_server(
            server=serializer.instance, user=self.request.user, **serializer.validated_data
        )

    def perform_destroy(self, instance: Server) -> None:
        services.delete_server(server=instance, user=self.request.user)

    @action(detail=True, methods=["post"])
    def rotate_token(self, request: Request, pk: str) -> Response:
        """A new server token (shown once); the old one stops working."""
        server = self.get_object()
        token = services.rotate_server_token(server=server, user=request.user)
        body = {**ServerSerializer(server, context={"request": request}).data}
        body["server_token"] = token
        return Response(body)

    @action(detail=True, methods=["post"])
    def forget_host_key(self, request: Request, pk: str) -> Response:
        """Drop the recorded SSH host key, so that the next run records the host's new one
        (after a reinstall of the host, say)."""
        server = services.forget_host_key(server=self.get_object(), user=request.user)
        return Response(ServerSerializer(server, context={"request": request}).data)


class AgentViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = AgentSerializer
    lookup_value_regex = r"\d+"
    http_method_names = ["get", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet[Agent]:
        params = self.request.query_params
        server = params.get("server", "")
        if server and not (server.isdigit() and len(server) < 19):
            raise exceptions.ValidationError({"server": ["Give a server id."]})
        try:
            chosen = AgentFilter(
                status=params.get("status", ""),
                search=params.get("search", ""),
                tag=params.get("tag", ""),
                server=int(server) if server else None,
            )
        except ValueError as exc:
            raise exceptions.ValidationError({"status": [str(exc)]}) from exc
        return chosen.apply(agents_visible_to(self.request.user))

    def perform_update(self, serializer: AgentSerializer) -> None:
        services.set_agent_tags(
            agent=serializer.instance,
            tags=serializer.validated_data.get("tags"),
            user=self.request.user,
        )
