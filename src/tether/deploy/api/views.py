"""Human API for deployments (read, cancel, the live log) and the lifecycle actions that
start them: `/api/agents/{id}/upgrade|stop|start/` and `/api/servers/{id}/install/`."""

from django.conf import settings
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from tether.fleet.api.views import AgentActionViewSet, ServerActionViewSet
from tether.fleet.models import Agent, Server
from tether.serializers import StrictInputMixin
from tether.sse import open_stream

from .. import lifecycle, services
from ..models import Deployment
from ..selectors import deployment_history, deployments_visible_to
from .serializers import DeploymentSerializer, DeploymentSummarySerializer
from .stream import deployment_events

K = Deployment.Kind


class DeploymentViewSet(mixins.RetrieveModelMixin, mixins.ListModelMixin, viewsets.GenericViewSet):
    lookup_value_regex = r"\d+"

    def get_queryset(self) -> QuerySet[Deployment]:
        return deployments_visible_to(self.request.user)

    def get_serializer_class(self) -> type:
        return DeploymentSummarySerializer if self.action == "list" else DeploymentSerializer

    @extend_schema(request=None, responses={202: DeploymentSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        """Cancel a queued or running deployment; a finished one answers 409."""
        deployment = services.cancel_deployment(deployment=self.get_object(), user=request.user)
        return Response(DeploymentSerializer(deployment).data, status=202)


@csrf_exempt  # GET only (anything else is a JSON 405); nothing here reads a form
async def deployment_stream(request: HttpRequest, deployment_id: int) -> HttpResponse:
    return await open_stream(request, deployments_visible_to, deployment_id, deployment_events)


class NoInput(StrictInputMixin, serializers.Serializer):
    """Lifecycle actions take no fields; anything sent is refused rather than ignored."""


ACCEPTED = inline_serializer(
    "DeploymentAccepted",
    {"deployment_id": serializers.IntegerField(), "method": serializers.CharField()},
)


def _lifecycle(request: Request, kind: str, server: Server, agent: Agent | None) -> Response:
    NoInput(data=request.data if request.data else {}).is_valid(raise_exception=True)
    deployment = lifecycle.request_deployment(
        kind=kind,
        server=server,
        agent=agent,
        user=request.user,
        server_url=settings.PUBLIC_URL,
    )
    body = {"deployment_id": deployment.pk, "method": deployment.method}
    return Response(body, status=status.HTTP_202_ACCEPTED)


class AgentLifecycleViewSet(AgentActionViewSet):
    """Lifecycle actions on one agent."""

    serializer_class = NoInput

    @extend_schema(responses={202: ACCEPTED})
    @action(detail=True, methods=["post"])
    def upgrade(self, request: Request, pk: str) -> Response:
        """Upgrade to the served agent version: through the agent when it is online, over SSH
        when it is not. A running upgrade of the agent is cancelled first."""
        agent = self.get_object()
        return _lifecycle(request, K.UPGRADE, agent.server, agent)

    @extend_schema(responses={202: ACCEPTED})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str) -> Response:
        """Stop the agent's service: it acknowledges and stops when online, else over SSH."""
        agent = self.get_object()
        return _lifecycle(request, K.STOP, agent.server, agent)

    @extend_schema(responses={202: ACCEPTED})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str) -> Response:
        """Start the agent's service over SSH; done when the agent is online again."""
        agent = self.get_object()
        return _lifecycle(request, K.START, agent.server, agent)

    @extend_schema(
        operation_id="agents_deployments_retrieve",
        responses={200: DeploymentSummarySerializer(many=True)},
    )
    @action(detail=True, methods=["get"], pagination_class=None)
    def deployments(self, request: Request, pk: str) -> Response:
        """The agent's latest deployments, newest first."""
        latest = deployment_history(self.get_object())
        return Response(DeploymentSummarySerializer(latest, many=True).data)


class ServerInstallViewSet(ServerActionViewSet):
    """`/api/servers/{id}/install/`, beside the fleet's server views."""

    serializer_class = NoInput

    @extend_schema(responses={202: ACCEPTED})
    @action(detail=True, methods=["post"])
    def install(self, request: Request, pk: str) -> Response:
        """Install the agent on this host over SSH; 202 with the deployment to watch."""
        return _lifecycle(request, K.INSTALL, self.get_object(), None)
