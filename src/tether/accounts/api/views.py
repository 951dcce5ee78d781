from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from tether.parsers import BoundedJSONParser

from ..models import ApiToken
from ..selectors import api_tokens_of
from ..services import create_api_token, default_token_days, revoke_api_token
from ..throttling import LOGIN_THROTTLES, FailedLoginThrottle
from .serializers import (
    ApiTokenSerializer,
    CreateApiTokenSerializer,
    NewApiTokenSerializer,
    ObtainTokenSerializer,
)

LOGIN_TOKEN_NAME = "API login"


def _created(user: Any, data: dict[str, Any], default_name: str = "") -> dict[str, Any]:
    """The answer to a token's creation: the token as listed, and its secret this once."""
    token, secret = create_api_token(
        user=user,
        name=data.get("name") or default_name,
        expires_in_days=data.get("expires_in_days", default_token_days()),
    )
    token.token = secret
    return NewApiTokenSerializer(token).data


class ObtainTokenView(APIView):
    """`POST /api/auth/token/ {username, password, name?, expires_in_days?}` -> a new token
    (`{token, id, name, prefix, created_at, expires_at, last_used_at}`): how tetherctl and
    scripts log in. Each call makes a new token; the old ones stay until they expire or are
    revoked. Failed attempts are throttled per username and per address (429)."""

    authentication_classes: list[type] = []
    permission_classes = [AllowAny]
    parser_classes = [BoundedJSONParser, FormParser, MultiPartParser]
    throttle_classes = list(LOGIN_THROTTLES)

    def get_throttles(self) -> list[FailedLoginThrottle]:
        # The same instances that checked the attempt record it when it fails.
        if not hasattr(self, "_throttles"):
            self._throttles = super().get_throttles()
        return self._throttles

    @extend_schema(request=ObtainTokenSerializer, responses={200: NewApiTokenSerializer})
    def post(self, request: Request) -> Response:
        serializer = ObtainTokenSerializer(data=request.data, context={"request": request})
        try:
            serializer.is_valid(raise_exception=True)
        except exceptions.ValidationError as exc:
            if wrong_credentials(exc):
                for throttle in self.get_throttles():
                    throttle.failed()
            raise
        return Response(
            _created(serializer.validated_data["user"], serializer.validated_data, LOGIN_TOKEN_NAME)
        )


def wrong_credentials(exc: exceptions.ValidationError) -> bool:
    """The password was checked and refused (DRF's `authorization` code on the whole body;
    a missing field or a bad expiry is refused before any password is checked)."""
    codes = exc.get_codes()
    return isinstance(codes, dict) and "authorization" in codes.get("non_field_errors", [])


class ApiTokenViewSet(mixins.ListModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """The caller's own tokens: list (never a secret), create (the secret shown once),
    revoke (DELETE). Another user's token, or a revoked one, is not found."""

    serializer_class = ApiTokenSerializer

    def get_queryset(self) -> QuerySet[ApiToken]:
        if getattr(self, "swagger_fake_view", False):  # the schema, made without a user
            return ApiToken.objects.none()
        return api_tokens_of(self.request.user)

    @extend_schema(request=CreateApiTokenSerializer, responses={201: NewApiTokenSerializer})
    def create(self, request: Request) -> Response:
        serializer = CreateApiTokenSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        body = _created(request.user, serializer.validated_data)
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: ApiToken) -> None:
        revoke_api_token(token=instance, user=self.request.user)
