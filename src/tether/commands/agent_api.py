"""Agent-facing command endpoints: the long-poll that hands out commands, and progress and
results (both dialects)."""

from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from tether import wakeups
from tether.fleet.agent_views import (
    AgentAPIView,
    RawText,
    agent_endpoint,
    peer_address,
)

from . import poll, reports, services, states
from .models import Command

# What the columns hold: exit codes in a 32-bit integer (a signal's negative number included),
# offsets and sizes in a 64-bit one. Past these an agent's report is a 400, never a 500.
EXIT_MIN, EXIT_MAX = -(2**31), 2**31 - 1
MAX_OFFSET = 2**62


class ProgressInput(serializers.Serializer):
    stdout = RawText(required=False, allow_null=True)
    stderr = RawText(required=False, allow_null=True)
    offset_stdout = serializers.IntegerField(
        min_value=0, max_value=MAX_OFFSET, required=False, allow_null=True
    )
    offset_stderr = serializers.IntegerField(
        min_value=0, max_value=MAX_OFFSET, required=False, allow_null=True
    )
    # The agent dropped this many bytes just before offset_<stream> (docs/agent-protocol.md,
    # "Output limits"): the server records them as dropped instead of asking for them.
    dropped_stdout = serializers.IntegerField(min_value=0, max_value=MAX_OFFSET, default=0)
    dropped_stderr = serializers.IntegerField(min_value=0, max_value=MAX_OFFSET, default=0)
    encoding = serializers.ChoiceField(choices=["utf-8", "base64"], default="utf-8")
    started_at = serializers.FloatField(required=False, allow_null=True)
    append = serializers.BooleanField(default=True)

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        for stream in ("stdout", "stderr"):
            dropped = data[f"dropped_{stream}"]
            offset = data.get(f"offset_{stream}")
            if dropped and (offset is None or dropped > offset):
                message = f"dropped_{stream} needs offset_{stream}, and cannot exceed it"
                raise serializers.ValidationError({f"dropped_{stream}": [message]})
        return data


class ResultInput(ProgressInput):
    status = serializers.ChoiceField(choices=sorted(states.AGENT_OUTCOMES), required=False)
    success = serializers.BooleanField(required=False)
    exit_code = serializers.IntegerField(
        min_value=EXIT_MIN, max_value=EXIT_MAX, required=False, allow_null=True
    )
    return_code = serializers.IntegerField(
        min_value=EXIT_MIN, max_value=EXIT_MAX, required=False, allow_null=True
    )
    error = RawText(required=False, allow_null=True)
    stdout_size = serializers.IntegerField(min_value=0, max_value=MAX_OFFSET, required=False)
    stderr_size = serializers.IntegerField(min_value=0, max_value=MAX_OFFSET, required=False)
    finished_at = serializers.FloatField(required=False, allow_null=True)
    # The agent dropped output past max_output_bytes before sending it.
    truncated = serializers.BooleanField(default=False)
    append = serializers.BooleanField(default=False)

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        data = super().validate(data)
        if "status" not in data and "success" not in data:
            raise serializers.ValidationError("a result needs `status` or `success`")
        return data


OK = inline_serializer("AgentOk", {"status": serializers.CharField()})


class CommandProgressView(AgentAPIView):
    @extend_schema(request=ProgressInput, responses={200: OK}, tags=["agent"])
    def post(self, request: Request, command_id: int) -> Response:
        data = ProgressInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            answer = services.record_progress(
                agent=self.get_agent(),
                command_id=command_id,
                chunks=reports.chunks_from_report(data.validated_data),
                started_at=data.validated_data.get("started_at"),
            )
        except Command.DoesNotExist as exc:
            raise exceptions.NotFound("No such command for this agent.") from exc
        return Response({"status": "ok", **answer})


class CommandResultView(AgentAPIView):
    max_body = settings.MAX_RESULT_BYTES

    @extend_schema(request=ResultInput, responses={200: OK}, tags=["agent"])
    def post(self, request: Request, command_id: int) -> Response:
        data = ResultInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            services.record_result(
                agent=self.get_agent(),
                command_id=command_id,
                result=reports.result_from_report(data.validated_data),
            )
        except Command.DoesNotExist as exc:
            raise exceptions.NotFound("No such command for this agent.") from exc
        return Response({"status": "ok"})


# ---------------------------------------------------------------------------------------------
# The long-poll
# ---------------------------------------------------------------------------------------------


@agent_endpoint
@csrf_exempt
async def poll_commands(request: HttpRequest) -> HttpResponse:
    """The long-poll as a Django view, for in-process clients (the test client): under
    `tether serve` tether.asgi answers the poll paths with `poll.serve` before Django sees
    them. Both answer with `poll.answer_poll`."""
    poll_request = poll.PollRequest(
        method=request.method or "GET",
        path=request.get_full_path(),
        query=request.GET.dict(),
        headers={name.lower(): value for name, value in request.headers.items()},
        body=request.body,
        peer=peer_address(request),
    )
    with wakeups.subscribe() as waiter:
        status, body = await poll.answer_poll(poll_request, waiter)
    response = JsonResponse(body, status=status)
    if status == 429:
        response["Retry-After"] = str(body["error"]["retry_after"])
    if poll.PATHS.get(request.path):
        for name, value in poll.DEPRECATION_HEADERS:
            response[name.decode()] = value.decode()
    return response


# Mounted at /api/agents/ (tether.urls); the older dialect's paths beside Tether's.
urlpatterns = [
    path("poll_commands/", poll_commands),
    path("poll/", poll_commands),
    path("command/", poll_commands),
]
for prefix in ("command", "commands"):
    urlpatterns += [
        path(f"{prefix}/<int:command_id>/progress/", CommandProgressView.as_view()),
        path(f"{prefix}/<int:command_id>/result/", CommandResultView.as_view()),
    ]
