"""The fleet app's human API, mounted at /api/ (tether.urls)."""

from rest_framework.routers import SimpleRouter

from .views import AgentViewSet, ServerViewSet

router = SimpleRouter()
router.register("agents", AgentViewSet, basename="agent")
router.register("servers", ServerViewSet, basename="server")

urlpatterns = router.urls
