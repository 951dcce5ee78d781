"""Human API for servers and agents (and the agent-scoped command actions)."""

from typing import Any

from django.db.models import Q, QuerySet
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from tether.accounts.selectors import (
    agents_visible_to,
    servers_visible_to,
    templates_visible_to,
)
from tether.commands import command_templates
from tether.commands import services as command_services
from tether.commands.api.serializers import (
    CommandSerializer,
    CommandSummarySerializer,
    SendCommandInput,
)
from tether.deploy import services as deploy_services
from tether.deploy.api.serializers import DeploymentSummarySerializer
from tether.errors import Conflict
from tether.pki import services as pki_services
from tether.serializers import StrictBoolean, StrictInputMixin

from .. import services
from ..models import Agent, Server
from .serializers import AgentSerializer, ServerSerializer

HISTORY_LENGTH = 50


class UpdateCertificateInput(StrictInputMixin, serializers.Serializer):
    regenerate = StrictBoolean(required=False)
    verify_ssl = StrictBoolean(required=False)


class NoInput(StrictInputMixin, serializers.Serializer):
    """Lifecycle actions take no fields; anything sent is refused rather than ignored."""


def _lifecycle(request: Request, kind: str, server: Server, agent: Agent | None) -> Response:
    NoInput(data=request.data if request.data else {}).is_valid(raise_exception=True)
    deployment = deploy_services.request_deployment(
        kind=kind,
        server=server,
        agent=agent,
        user=request.user,
        server_url=request.build_absolute_uri("/").rstrip("/"),
    )
    body = {"deployment_id": deployment.pk, "method": deployment.method}
    return Response(body, status=status.HTTP_202_ACCEPTED)


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
    def install(self, request: Request, pk: str) -> Response:
        """Install the agent on this host over SSH; 202 with the deployment to watch."""
        return _lifecycle(request, "install", self.get_object(), None)

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
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet[Agent]:
        qs = agents_visible_to(self.request.user)
        params = self.request.query_params
        if state := params.get("status"):
            if state not in Agent.Status.values:
                raise exceptions.ValidationError(
                    {"status": [f"must be one of {Agent.Status.values}"]}
                )
            qs = qs.filter(status=state)
        if search := params.get("search"):
            qs = qs.filter(Q(hostname__icontains=search) | Q(server__name__icontains=search))
        if tag := params.get("tag"):
            # JSON containment is not portable to SQLite; tags lists are short.
            tagged = [pk for pk, tags in qs.values_list("pk", "tags") if tag in (tags or [])]
            qs = qs.filter(pk__in=tagged)
        return qs

    def perform_update(self, serializer: AgentSerializer) -> None:
        services.set_agent_tags(
            agent=serializer.instance,
            tags=serializer.validated_data.get("tags"),
            user=self.request.user,
        )

    @action(detail=True, methods=["post"])
    def send_command(self, request: Request, pk: str) -> Response:
        """Queue a command (a line, an argv, or a template with parameters) for this agent."""
        agent = self.get_object()
        data = SendCommandInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        timeout = values.get("timeout")
        if "template" in values:
            template = templates_visible_to(request.user).filter(pk=values["template"]).first()
            if template is None:
                raise exceptions.ValidationError({"template": ["No such template."]})
            try:
                line = command_templates.render(
                    template.command, template.parameters, values.get("params", {})
                )
            except command_templates.TemplateError as exc:
                raise exceptions.ValidationError({"params": [str(exc)]}) from exc
            timeout = timeout or template.timeout
            command = command_services.queue_command(
                agent=agent, command=line, timeout=timeout, user=request.user
            )
        else:
            command = command_services.queue_command(
                agent=agent,
                command=values["command"],
                args=values.get("args"),
                timeout=timeout,
                user=request.user,
            )
        return Response(CommandSerializer(command).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def upgrade(self, request: Request, pk: str) -> Response:
        """Upgrade to the served agent version: through the agent when it is online, over SSH
        when it is not. A running upgrade of the agent is cancelled first."""
        agent = self.get_object()
        return _lifecycle(request, "upgrade", agent.server, agent)

    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str) -> Response:
        """Stop the agent's service: it acknowledges and stops when online, else over SSH."""
        agent = self.get_object()
        return _lifecycle(request, "stop", agent.server, agent)

    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str) -> Response:
        """Start the agent's service over SSH; done when the agent is online again."""
        agent = self.get_object()
        return _lifecycle(request, "start", agent.server, agent)

    @action(detail=True, methods=["post"])
    def update_certificate(self, request: Request, pk: str) -> Response:
        """`regenerate: true` issues a new RPC certificate (the old one is revoked at once) and
        delivers it; `verify_ssl` sets whether either side verifies the other's certificate."""
        agent = self.get_object()
        data = UpdateCertificateInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        if values.get("regenerate") and not agent.signs_requests:
            raise Conflict(
                "an agent of the original dialect has no RPC endpoint to certify",
                code="legacy_agent",
            )
        if "verify_ssl" in values:
            pki_services.set_verify_ssl(
                agent=agent, verify_ssl=values["verify_ssl"], user=request.user
            )
        if values.get("regenerate"):
            pki_services.issue_certificate(agent=agent, user=request.user)
        return Response(pki_services.certificate_answer(agent))

    @action(detail=True, methods=["get"])
    def deployments(self, request: Request, pk: str) -> Response:
        """The agent's latest deployments, newest first."""
        agent = self.get_object()
        latest = agent.deployments.select_related("created_by")[:HISTORY_LENGTH]
        return Response(DeploymentSummarySerializer(latest, many=True).data)

    @action(detail=True, methods=["get"])
    def commands(self, request: Request, pk: str) -> Response:
        """The agent's latest commands, newest first."""
        agent = self.get_object()
        latest = agent.commands.select_related("created_by").order_by("-created_at", "-id")
        return Response(CommandSummarySerializer(latest[:HISTORY_LENGTH], many=True).data)
