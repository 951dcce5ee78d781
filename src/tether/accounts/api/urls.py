"""The accounts app's human API (tokens, the audit log), mounted at /api/ (tether.urls)."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from .audit import AuditEventList
from .views import ApiTokenViewSet, ObtainTokenView

router = SimpleRouter()
router.register("auth/tokens", ApiTokenViewSet, basename="api-token")

urlpatterns = [
    path("auth/token/", ObtainTokenView.as_view(), name="obtain-token"),
    path("audit/", AuditEventList.as_view(), name="audit-events"),
    *router.urls,
]
