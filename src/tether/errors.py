"""One JSON error shape for every refusal: `{"error": {"code", "message", ...}}` (DESIGN §7).

Views raise; this module turns the exception into the body. Nothing here shows a stack trace
to a client: unexpected errors are logged by Django and answered with a bare 500 body.
"""

from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class TetherError(exceptions.APIException):
    """An API error with a stable machine-readable code and optional extra fields."""

    def __init__(self, message: str, *, code: str, status_code: int, **extra: Any) -> None:
        super().__init__(detail=message, code=code)
        self.status_code = status_code
        self.error_code = code
        self.extra = extra


class Conflict(TetherError):
    def __init__(self, message: str, *, code: str = "conflict", **extra: Any) -> None:
        super().__init__(message, code=code, status_code=status.HTTP_409_CONFLICT, **extra)


class PayloadTooLarge(TetherError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"request body is larger than {limit} bytes",
            code="too_large",
            status_code=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            limit=limit,
        )


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def json_error(code: str, message: str, status_code: int, **extra: Any) -> JsonResponse:
    return JsonResponse(error_body(code, message, **extra), status=status_code)


def first_message(detail: Any) -> str:
    """The one line an error body's `message` says (`field: problem`), for the pages too."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            inner = first_message(value)
            return inner if key == "non_field_errors" else f"{key}: {inner}"
    if isinstance(detail, list) and detail:
        return first_message(detail[0])
    return str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, RequestDataTooBig):
        from django.conf import settings

        exc = PayloadTooLarge(settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()

    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, TetherError):
        response.data = error_body(exc.error_code, str(exc.detail), **exc.extra)
    elif isinstance(exc, exceptions.ValidationError):
        response.data = error_body("invalid", first_message(exc.detail), fields=exc.detail)
    else:
        codes = exc.get_codes() if isinstance(exc, exceptions.APIException) else "error"
        code = codes if isinstance(codes, str) else "error"
        response.data = error_body(code, first_message(response.data.get("detail", exc)))
    if "Retry-After" in response:  # a throttle's 429: the wait in the body too
        response.data["error"]["retry_after"] = int(response["Retry-After"])
    return response


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """JSON for the API and agents; a page for a browser on the web UI's paths."""
    wants_page = "text/html" in request.headers.get("Accept", "")
    if wants_page and not request.path.startswith("/api/"):
        from django.template.loader import render_to_string

        body = render_to_string("web/404.html", request=request)
        return HttpResponse(body, status=404)
    return json_error("not_found", "Not found.", 404)


def server_error(request: HttpRequest) -> JsonResponse:
    return json_error("server_error", "Internal server error.", 500)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    if isinstance(exception, RequestDataTooBig):
        return json_error("too_large", "request body is too large", 413)
    return json_error("bad_request", "Bad request.", 400)


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return json_error("permission_denied", "Permission denied.", 403)
