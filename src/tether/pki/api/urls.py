"""The pki app's human API, mounted at /api/ (tether.urls)."""

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from .views import AgentCertificateViewSet, check_status, check_status_many

router = SimpleRouter()
router.register("agents", AgentCertificateViewSet, basename="agent-certificate")

urlpatterns = [
    path("agents/check_status/", check_status_many),
    path("agents/<int:agent_id>/check_status/", check_status),
    path("", include(router.urls)),
]
