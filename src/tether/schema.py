"""The OpenAPI schema at /api/schema/ says what the server really answers (DESIGN §7).

drf-spectacular documents what a view declares; it cannot know that every operation can also
refuse. `TetherAutoSchema` (REST_FRAMEWORK's DEFAULT_SCHEMA_CLASS) adds the error answers once,
from what the operation is: a body can be malformed (400) or too large (413), a login can be
missing (401) or a session's CSRF token (403), an id can be someone else's (404), an action on
an object can meet the wrong state (409), and agent calls and logins are throttled (429). It
also says which request bodies refuse unknown fields (`additionalProperties: false`) and
which headers a signing agent sends.

The views DRF does not serve are described in tether.schema_views, whose generator
(SPECTACULAR_SETTINGS' DEFAULT_GENERATOR_CLASS) attaches them before it walks the URLconf.
"""

from typing import Any

from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from drf_spectacular.utils import inline_serializer as inline
from rest_framework import serializers
from rest_framework.permissions import AllowAny

from tether.serializers import StrictInputMixin

ERROR = inline(
    "Error",
    {
        "error": inline(
            "ErrorDetail", {"code": serializers.CharField(), "message": serializers.CharField()}
        )
    },
)

ERRORS = {
    400: "Bad input (malformed JSON, an unknown field, a value out of range); nothing changed.",
    401: "Missing, unknown, expired or revoked credentials; every refusal looks the same.",
    403: "Not allowed: a session without its CSRF token, or an action for staff only.",
    404: "No such object, or not yours.",
    409: "The object's state does not allow this (already finished, already online, ...).",
    413: "The request body is larger than the server accepts.",
    429: "Too many requests; Retry-After says when to try again.",
}

UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}

SIGNING_HEADERS = [
    OpenApiParameter(
        "X-Tether-Timestamp",
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        description="Unix time in seconds; a signing agent's request outside the window is "
        "refused.",
    ),
    OpenApiParameter(
        "X-Tether-Nonce",
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        description="16-64 characters of [A-Za-z0-9_-], fresh for every request; a nonce "
        "seen before within the window is refused.",
    ),
    OpenApiParameter(
        "X-Tether-Signature",
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        description="HMAC-SHA256 with the agent's secret key over method, path, timestamp, "
        "nonce and the body's SHA-256 (docs/agent-protocol.md). Required of agents that "
        "registered as signing.",
    ),
]


class TetherAutoSchema(AutoSchema):
    """Declares, per operation, the refusals it can answer with the errors.py body."""

    def is_agent_operation(self) -> bool:
        return bool(getattr(self.view, "agent_endpoint", False))

    def requires_credentials(self) -> bool:
        if not self.view.authentication_classes:
            return False
        return not all(isinstance(p, AllowAny) for p in self.view.get_permissions())

    def takes_body(self) -> bool:
        return self.method in {"POST", "PUT", "PATCH"}

    def is_deprecated(self) -> bool:
        from tether.commands.poll import PATHS  # the poll paths and which are deprecated

        return super().is_deprecated() or PATHS.get(self.path, False)

    def names_an_object(self) -> bool:
        return "{" in self.path

    def error_codes(self, operation: dict[str, Any]) -> list[int]:
        """The refusals this operation can answer with, from what it is."""
        agent = self.is_agent_operation()
        credentials = self.requires_credentials()
        query = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        codes = []
        if self.takes_body() or query:
            codes.append(400)  # malformed or unknown input, in the body or the query
        if credentials or agent and self.takes_body():
            codes.append(401)  # (registration: the server token is the credential)
        if credentials and not agent:
            codes.append(403)  # a session's CSRF check, staff-only actions
        if self.names_an_object() or "page" in query or self.takes_body() and credentials:
            codes.append(404)  # someone else's object (a body names some); a page past the end
        if self.method in UNSAFE and self.names_an_object():
            codes.append(409)
        if self.takes_body():
            codes.append(413)
        if agent or self.view.get_throttles() or not credentials and self.takes_body():
            codes.append(429)  # agents, failed agent logins, registration and logins
        return codes

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is None:
            return None
        responses = operation["responses"]
        for code in self.error_codes(operation):
            answer = OpenApiResponse(ERROR, description=ERRORS[code])
            responses.setdefault(
                str(code), self._get_response_for_code(answer, str(code), ["application/json"])
            )
        return operation

    def get_override_parameters(self) -> list[Any]:
        parameters = list(super().get_override_parameters())
        if self.is_agent_operation() and self.requires_credentials():
            parameters += SIGNING_HEADERS
        return parameters

    def _map_serializer(self, serializer: Any, direction: Any, bypass_extensions: bool = False):
        schema = super()._map_serializer(serializer, direction, bypass_extensions)
        if direction == "request" and isinstance(serializer, StrictInputMixin):
            schema["additionalProperties"] = False  # an unknown field is a 400, not ignored
        return schema


class LimitField(OpenApiSerializerFieldExtension):
    """A run's max_concurrency / max_errors: a count, or a percentage such as "20%"."""

    target_class = "tether.commands.api.runs.Limit"

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        return {
            "oneOf": [
                {"type": "integer", "minimum": self.target.minimum, "maximum": 1_000_000},
                {"type": "string", "pattern": r"^\d{1,3}%$"},
            ]
        }
