"""Human API for deployments: read, cancel, and the live log."""

from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from tether.accounts.selectors import deployments_visible_to
from tether.sse import open_stream

from .. import services
from ..models import Deployment
from .serializers import DeploymentSerializer, DeploymentSummarySerializer
from .stream import deployment_events


class DeploymentViewSet(mixins.RetrieveModelMixin, mixins.ListModelMixin, viewsets.GenericViewSet):
    lookup_value_regex = r"\d+"

    def get_queryset(self) -> QuerySet[Deployment]:
        return deployments_visible_to(self.request.user)

    def get_serializer_class(self) -> type:
        return DeploymentSummarySerializer if self.action == "list" else DeploymentSerializer

    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        """Cancel a queued or running deployment; a finished one answers 409."""
        deployment = services.cancel_deployment(deployment=self.get_object(), user=request.user)
        return Response(DeploymentSerializer(deployment).data, status=202)


async def deployment_stream(request: HttpRequest, deployment_id: int) -> HttpResponse:
    return await open_stream(request, deployments_visible_to, deployment_id, deployment_events)
