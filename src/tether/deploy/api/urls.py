"""The deploy app's human API, mounted at /api/ (tether.urls)."""

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from .rollouts import RolloutViewSet
from .views import AgentLifecycleViewSet, DeploymentViewSet, ServerInstallViewSet, deployment_stream

router = SimpleRouter()
router.register("agents", AgentLifecycleViewSet, basename="agent-lifecycle")
router.register("servers", ServerInstallViewSet, basename="server-install")
router.register("deployments", DeploymentViewSet, basename="deployment")
router.register("rollouts", RolloutViewSet, basename="rollout")

urlpatterns = [
    path("deployments/<int:deployment_id>/stream/", deployment_stream),
    path("", include(router.urls)),
]
