from django.contrib import admin
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView
from rest_framework.authtoken.views import obtain_auth_token
from rest_framework.routers import SimpleRouter

from tether.commands import agent_api as command_agent_api
from tether.commands.api.stream import command_stream
from tether.commands.api.views import CommandTemplateViewSet, CommandViewSet
from tether.deploy import agent_api as deploy_agent_api
from tether.deploy.api.views import DeploymentViewSet, deployment_stream
from tether.fleet import agent_api as fleet_agent_api
from tether.fleet.api.views import AgentViewSet, ServerViewSet
from tether.pki import views as pki_views


def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database answers; load balancers and `make run` wait on it."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        return JsonResponse({"status": "error", "database": "unreachable"}, status=503)
    return JsonResponse({"status": "ok"})


# Agent-facing routes come first: `agents/register/` must not be read as an agent id.
agent_urls = [
    path("register/", fleet_agent_api.RegisterView.as_view()),
    path("poll_commands/", fleet_agent_api.poll_commands),
    path("poll/", fleet_agent_api.poll_commands),
    path("command/", fleet_agent_api.deprecated_command_poll),
    path("heartbeat/", fleet_agent_api.HeartbeatView.as_view()),
    path("files/manifest.json/", fleet_agent_api.ManifestView.as_view()),
    path("files/<str:filename>/", fleet_agent_api.agent_file),
]
for prefix in ("command", "commands"):
    agent_urls += [
        path(
            f"{prefix}/<int:command_id>/progress/", command_agent_api.CommandProgressView.as_view()
        ),
        path(f"{prefix}/<int:command_id>/result/", command_agent_api.CommandResultView.as_view()),
    ]
for prefix in ("deployment", "deployments"):
    agent_urls.append(
        path(
            f"{prefix}/<int:deployment_id>/progress/",
            deploy_agent_api.DeploymentProgressView.as_view(),
        )
    )

router = SimpleRouter()
router.register("agents/command-templates", CommandTemplateViewSet, basename="command-template")
router.register("agents", AgentViewSet, basename="agent")
router.register("servers", ServerViewSet, basename="server")
router.register("commands", CommandViewSet, basename="command")
router.register("deployments", DeploymentViewSet, basename="deployment")

urlpatterns = [
    path("healthz", healthz),
    path("healthz/", healthz),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/auth/token/", obtain_auth_token),
    path("api/agents/", include(agent_urls)),
    path("api/commands/<int:command_id>/stream/", command_stream),
    path("api/deployments/<int:deployment_id>/stream/", deployment_stream),
    path("api/agents/<int:agent_id>/check_status/", pki_views.check_status),
    path("api/", include(router.urls)),
    path("", include("tether.web.urls")),
]

handler400 = "tether.errors.bad_request"
handler403 = "tether.errors.permission_denied"
handler404 = "tether.errors.not_found"
handler500 = "tether.errors.server_error"
