"""The project's routes: each app's own, mounted in one place.

Each app keeps its agent-facing routes in `agent_api.py` (mounted at /api/agents/) and its
human API in `api/urls.py` (mounted at /api/); the web UI is mounted at / after them. Routes
that act on an agent or a server (`/api/agents/{id}/send_command/`, `/api/servers/{id}/install/`)
live with the app that does the acting, registered on the same prefix.
"""

from django.contrib import admin
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from tether.commands import agent_api as commands_agent_api
from tether.deploy import agent_api as deploy_agent_api
from tether.fleet import agent_api as fleet_agent_api
from tether.monitoring import metrics_view


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
    *fleet_agent_api.urlpatterns,
    *commands_agent_api.urlpatterns,
    *deploy_agent_api.urlpatterns,
]

api_urls = [
    path("", include("tether.accounts.api.urls")),
    path("", include("tether.fleet.api.urls")),
    path("", include("tether.commands.api.urls")),
    path("", include("tether.pki.api.urls")),
    path("", include("tether.deploy.api.urls")),
]

urlpatterns = [
    path("healthz", healthz),
    path("healthz/", healthz),
    path("metrics", metrics_view),
    path("metrics/", metrics_view),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/agents/", include(agent_urls)),
    path("api/", include(api_urls)),
    path("", include("tether.web.urls")),
]

handler400 = "tether.errors.bad_request"
handler403 = "tether.errors.permission_denied"
handler404 = "tether.errors.not_found"
handler500 = "tether.errors.server_error"
