"""Shared plumbing for agent-facing views: the base class, body limits and error answers.

Each app's agent views live in its `agent_api.py`, apart from its human API; both sides
share services, never views. The fleet owns agent authentication, so the base lives here.
"""

from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import exceptions, serializers
from rest_framework.views import APIView

from tether.accounts.origin import address_of, peer_address  # noqa: F401 (agent views use them)
from tether.errors import PayloadTooLarge, exception_handler

from . import guard
from .authentication import AgentTokenAuthentication, IsAgent
from .models import Agent


def agent_endpoint(view: Any) -> Any:
    """Mark a function view as agent-facing: tether.asgi serves it without the human
    middleware stack."""
    view.agent_endpoint = True
    return view


def check_body_size(request: HttpRequest, limit: int) -> None:
    """Refuse a body over `limit` before reading it."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError as exc:
        raise exceptions.ParseError("invalid Content-Length") from exc
    if length > limit:
        raise PayloadTooLarge(limit)


def error_response(exc: exceptions.APIException) -> JsonResponse:
    """The JSON error answer for an async view (which DRF does not wrap): the same body the
    project's exception handler gives every other view."""
    response = exception_handler(exc, {})
    assert response is not None  # every APIException has an answer
    return JsonResponse(response.data, status=response.status_code)


class AgentAPIView(APIView):
    """Base for agent endpoints: agent-token auth, a body limit, no human session."""

    authentication_classes = [AgentTokenAuthentication]
    permission_classes = [IsAgent]
    max_body = settings.MAX_REQUEST_BYTES
    agent_endpoint = True  # served by the thin ASGI route (tether.asgi)

    def initial(self, request: Any, *args: Any, **kwargs: Any) -> None:
        check_body_size(request, self.max_body)
        guard.refuse_blocked(peer_address(request))
        try:
            super().initial(request, *args, **kwargs)
        except (exceptions.AuthenticationFailed, exceptions.NotAuthenticated):
            guard.note_failure(peer_address(request))
            raise

    def get_agent(self) -> Agent:
        """The agent the request authenticated as."""
        return self.request.auth


@extend_schema_field(OpenApiTypes.STR)
class RawText(serializers.Field):
    """Command output as sent: any string, NUL characters and whitespace kept as they are."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            raise serializers.ValidationError("must be a string")
        return data

    def to_representation(self, value: str) -> str:
        return value
