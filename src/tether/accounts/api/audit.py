"""`GET /api/audit/`: the audit log, newest first, paged like the other lists. Staff read
every event, others the events they are the actor of (docs/audit.md)."""

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers
from rest_framework.exceptions import ValidationError

from ..models import AuditEvent
from ..selectors import audit_events_visible_to, filter_audit_events

TARGET = r"^[a-z_]{1,32}(:[^\s]{1,64})?\Z"


class AuditFilterSerializer(serializers.Serializer):
    """The log's filters, read from the query string by the API and the page alike: a bad
    value is a 400 that says which, never an empty page."""

    actor = serializers.CharField(max_length=150, required=False, allow_blank=True)
    action = serializers.RegexField(
        r"^[a-z0-9_.]{1,64}\Z",
        required=False,
        allow_blank=True,
        error_messages={"invalid": "An action such as command.send, or a prefix such as agent."},
    )
    target = serializers.RegexField(
        TARGET,
        required=False,
        allow_blank=True,
        error_messages={"invalid": "A target type (server) or type:id (server:12)."},
    )
    since = serializers.DateTimeField(required=False, allow_null=True)
    until = serializers.DateTimeField(required=False, allow_null=True)

    def to_internal_value(self, data: Any) -> Any:
        # An empty field of the page's GET form means "any", as its absence does.
        if hasattr(data, "dict"):
            data = data.dict()
        data = {k: v for k, v in data.items() if k in self.fields and v != ""}
        return super().to_internal_value(data)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        since, until = attrs.get("since"), attrs.get("until")
        if since is not None and until is not None and since >= until:
            raise ValidationError({"until": ["Must be later than since."]})
        return attrs

    def filters(self) -> dict[str, Any]:
        """The validated filters as filter_audit_events takes them."""
        data = dict(self.validated_data)
        target_type, _, target_id = data.pop("target", "").partition(":")
        return {**data, "target_type": target_type, "target_id": target_id}


def filtered_events(user: Any, query: Any) -> QuerySet[AuditEvent]:
    """The events `user` may read that match the query string (ValidationError if bad)."""
    filters = AuditFilterSerializer(data=query)
    filters.is_valid(raise_exception=True)
    return filter_audit_events(audit_events_visible_to(user), **filters.filters())


class AuditEventSerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="user.username", default=None, read_only=True)
    target = serializers.SerializerMethodField()

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "at",
            "actor",
            "action",
            "target",
            "target_type",
            "target_id",
            "details",
            "address",
            "user_agent",
        ]
        read_only_fields = fields

    def get_target(self, event: AuditEvent) -> str:
        return f"{event.target_type}:{event.target_id}"


@extend_schema(parameters=[AuditFilterSerializer], tags=["audit"])
class AuditEventList(generics.ListAPIView):
    """Who did what to which object, when and from where; filters `actor` (username),
    `action` (exact, or a prefix ending in a dot), `target` (type or type:id), `since` and
    `until` (ISO 8601)."""

    serializer_class = AuditEventSerializer

    def get_queryset(self) -> QuerySet[AuditEvent]:
        if getattr(self, "swagger_fake_view", False):  # the schema, made without a user
            return AuditEvent.objects.none()
        return filtered_events(self.request.user, self.request.query_params)
