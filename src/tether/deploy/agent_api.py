"""Agent-facing deployment endpoint: the agent appends to its own deployment's log."""

from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from tether.fleet.agent_views import AgentAPIView, RawText

from . import services
from .models import Deployment


class DeploymentLogInput(serializers.Serializer):
    log = RawText()
    # An agent may end its own deployment as failed (a rolled-back upgrade), never succeed it.
    status = serializers.ChoiceField(choices=[Deployment.Status.FAILED], required=False)


class DeploymentProgressView(AgentAPIView):
    @extend_schema(request=DeploymentLogInput, responses={200: dict}, tags=["agent"])
    def post(self, request: Request, deployment_id: int) -> Response:
        data = DeploymentLogInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            deployment = services.append_log(
                deployment_id=deployment_id, text=data.validated_data["log"], agent=self.get_agent()
            )
        except Deployment.DoesNotExist as exc:
            raise exceptions.NotFound("No such deployment for this agent.") from exc
        if data.validated_data.get("status") == Deployment.Status.FAILED:
            deployment = services.end_deployment(
                deployment=deployment, status=Deployment.Status.FAILED, line=""
            )
        # The agent learns here that its deployment was cancelled.
        return Response({"status": "ok", "deployment_status": deployment.status})


# Mounted at /api/agents/ (tether.urls); the older dialect's path beside Tether's.
urlpatterns = [
    path(f"{prefix}/<int:deployment_id>/progress/", DeploymentProgressView.as_view())
    for prefix in ("deployment", "deployments")
]
