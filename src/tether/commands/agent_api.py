"""Agent-facing command endpoints: the long-poll that hands out commands, and progress and
results (both dialects)."""

import time
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
from tether.db import run_db
from tether.errors import json_error
from tether.fleet import services as fleet_services
from tether.fleet.agent_views import (
    AgentAPIView,
    RawText,
    agent_endpoint,
    check_body_size,
    error_response,
    peer_address,
)
from tether.fleet.authentication import authenticate_agent
from tether.fleet.models import Agent

from . import reports, services, states
from .models import Command


class ProgressInput(serializers.Serializer):
    stdout = RawText(required=False, allow_null=True)
    stderr = RawText(required=False, allow_null=True)
    offset_stdout = serializers.IntegerField(min_value=0, required=False, allow_null=True)
    offset_stderr = serializers.IntegerField(min_value=0, required=False, allow_null=True)
    encoding = serializers.ChoiceField(choices=["utf-8", "base64"], default="utf-8")
    started_at = serializers.FloatField(required=False, allow_null=True)
    append = serializers.BooleanField(default=True)


class ResultInput(ProgressInput):
    status = serializers.ChoiceField(choices=sorted(states.AGENT_OUTCOMES), required=False)
    success = serializers.BooleanField(required=False)
    exit_code = serializers.IntegerField(required=False, allow_null=True)
    return_code = serializers.IntegerField(required=False, allow_null=True)
    error = RawText(required=False, allow_null=True)
    stdout_size = serializers.IntegerField(min_value=0, required=False)
    stderr_size = serializers.IntegerField(min_value=0, required=False)
    finished_at = serializers.FloatField(required=False, allow_null=True)
    # The agent dropped output past max_output_bytes before sending it.
    truncated = serializers.BooleanField(default=False)
    append = serializers.BooleanField(default=False)

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
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


def _poll_params(request: HttpRequest) -> tuple[float, str | None, int | None]:
    try:
        wait = float(request.GET.get("wait") or 0)
        rpc_port = int(request.GET["rpc_port"]) if request.GET.get("rpc_port") else None
    except ValueError as exc:
        raise exceptions.ValidationError("wait and rpc_port must be numbers") from exc
    if wait != wait or wait < 0:  # NaN or negative
        raise exceptions.ValidationError("wait must be a number of seconds >= 0")
    if rpc_port is not None and not 0 <= rpc_port <= 65535:
        raise exceptions.ValidationError("rpc_port must be 0..65535")
    wait = min(wait, fleet_services.effective_long_poll_timeout())
    return wait, (request.GET.get("version") or None), rpc_port


def _open_poll(
    request: HttpRequest, waiter: wakeups.Waiter
) -> tuple[Agent, float, services.Delivery]:
    """Authenticate, subscribe to wake-ups, record the heartbeat and claim work: one trip
    to the database thread. Subscribing before the claim means a command queued in between
    still wakes the poll."""
    check_body_size(request, settings.MAX_REQUEST_BYTES)
    agent = authenticate_agent(request)
    wait, version, rpc_port = _poll_params(request)
    wakeups.register(wakeups.agent_key(agent.pk), waiter)
    fleet_services.record_heartbeat(
        agent=agent, version=version, rpc_port=rpc_port, address=peer_address(request)
    )
    return agent, wait, services.claim_commands(agent=agent)


def _poll_answer(agent: Agent, delivery: services.Delivery) -> dict[str, Any]:
    return {
        "commands": [services.as_delivered(c) for c in delivery.commands],
        "cancel": delivery.cancel,
        "config": fleet_services.agent_config(agent),
    }


@agent_endpoint
@csrf_exempt
async def poll_commands(request: HttpRequest) -> HttpResponse:
    """Long-poll: answer as soon as there is work (or a cancel) for this agent, else after
    `wait` seconds. Every poll is a heartbeat."""
    if request.method not in ("GET", "POST"):
        return json_error("method_not_allowed", f"Method {request.method} not allowed.", 405)
    with wakeups.subscribe() as waiter:
        try:
            agent, wait, delivery = await run_db(_open_poll, request, waiter)
        except exceptions.APIException as exc:
            return error_response(exc)
        deadline = time.monotonic() + wait
        while not (delivery.commands or delivery.cancel):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await waiter.wait(min(remaining, settings.POLL_RECHECK))
            delivery = await run_db(services.claim_commands, agent=agent)
    return JsonResponse(_poll_answer(agent, delivery))


@agent_endpoint
@csrf_exempt
async def deprecated_command_poll(request: HttpRequest) -> HttpResponse:
    """`POST /api/agents/command/`: the original poll path, kept with a Deprecation header."""
    response = await poll_commands(request)
    response["Deprecation"] = "true"
    response["Link"] = '</api/agents/poll_commands/>; rel="successor-version"'
    return response


# Mounted at /api/agents/ (tether.urls); the older dialect's paths beside Tether's.
urlpatterns = [
    path("poll_commands/", poll_commands),
    path("poll/", poll_commands),
    path("command/", deprecated_command_poll),
]
for prefix in ("command", "commands"):
    urlpatterns += [
        path(f"{prefix}/<int:command_id>/progress/", CommandProgressView.as_view()),
        path(f"{prefix}/<int:command_id>/result/", CommandResultView.as_view()),
    ]
