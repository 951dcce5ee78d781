"""The commands app's human API, mounted at /api/ (tether.urls)."""

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from .run_stream import run_stream
from .runs import RunViewSet
from .stream import command_stream
from .views import AgentCommandViewSet, CommandTemplateViewSet, CommandViewSet

router = SimpleRouter()
router.register("agents/command-templates", CommandTemplateViewSet, basename="command-template")
router.register("agents", AgentCommandViewSet, basename="agent-command")
router.register("commands", CommandViewSet, basename="command")
router.register("runs", RunViewSet, basename="run")

urlpatterns = [
    path("commands/<int:command_id>/stream/", command_stream),
    path("runs/<int:run_id>/stream/", run_stream),
    path("", include(router.urls)),
]
