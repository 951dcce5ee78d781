from rest_framework import serializers
from rest_framework.authtoken.serializers import AuthTokenSerializer

from tether.serializers import StrictInputMixin

from ..models import ApiToken

MAX_DAYS = 3650


def expires_in_days() -> serializers.IntegerField:
    """Absent: TETHER_TOKEN_DAYS; null: never expires (asked for explicitly); else 1..3650."""
    return serializers.IntegerField(
        min_value=1, max_value=MAX_DAYS, required=False, allow_null=True
    )


class ApiTokenSerializer(serializers.ModelSerializer):
    """A token as listed: never its secret, which the server does not have."""

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "expires_at", "last_used_at"]
        read_only_fields = fields


class NewApiTokenSerializer(ApiTokenSerializer):
    """A token as created: the one answer that carries its secret."""

    token = serializers.CharField(read_only=True)

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class CreateApiTokenSerializer(StrictInputMixin, serializers.Serializer):
    name = serializers.CharField(max_length=100)
    expires_in_days = expires_in_days()


class ObtainTokenSerializer(AuthTokenSerializer):
    """DRF's username-and-password check (its refusal text included), plus what names and
    bounds the token it answers with."""

    name = serializers.CharField(max_length=100, required=False)
    expires_in_days = expires_in_days()
