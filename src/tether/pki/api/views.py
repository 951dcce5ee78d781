"""Human API for agent certificates: `POST /api/agents/{id}/update_certificate/`, and
`POST /api/agents/{id}/check_status/`, a native async view, so that a status check waits on
a socket, not on one of the server's threads (DRF views run on Django's one sync thread)."""

import json
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, serializers
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from tether.commands.api.runs import TargetsInput, target_agents
from tether.db import run_db
from tether.errors import json_error
from tether.fleet.agent_views import error_response
from tether.fleet.api.views import AgentActionViewSet
from tether.fleet.models import Agent
from tether.fleet.selectors import agents_visible_to
from tether.serializers import StrictBoolean, StrictInputMixin
from tether.sse import authenticated_user

from .. import rpc, services


class UpdateCertificateInput(StrictInputMixin, serializers.Serializer):
    regenerate = StrictBoolean(required=False)
    verify_ssl = StrictBoolean(required=False)


CERTIFICATE = inline_serializer(
    "AgentCertificate",
    {
        "serial": serializers.CharField(allow_null=True),
        "fingerprint_sha256": serializers.CharField(allow_null=True),
        "not_after": serializers.DateTimeField(allow_null=True),
        "verify_ssl": serializers.BooleanField(),
        "pending": serializers.BooleanField(),
    },
)


class AgentCertificateViewSet(AgentActionViewSet):
    """The agent's RPC certificate."""

    serializer_class = UpdateCertificateInput

    @extend_schema(request=UpdateCertificateInput, responses={200: CERTIFICATE})
    @action(detail=True, methods=["post"])
    def update_certificate(self, request: Request, pk: str) -> Response:
        """`regenerate: true` issues a new RPC certificate (the old one is revoked at once) and
        delivers it; `verify_ssl` sets whether either side verifies the other's certificate."""
        agent: Agent = self.get_object()
        data = UpdateCertificateInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.update_certificate(agent=agent, user=request.user, **data.validated_data)
        return Response(services.certificate_answer(agent))


def _target(request: HttpRequest, agent_id: int) -> rpc.Target | None:
    """Authorize, refuse any input, and read what the call needs; None: no RPC endpoint."""
    user = authenticated_user(request)
    agent = agents_visible_to(user).filter(pk=agent_id).first()
    if agent is None:
        raise exceptions.NotFound()
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, RecursionError) as exc:
        raise exceptions.ParseError("The body is not JSON.") from exc
    if body != {}:
        raise exceptions.ValidationError("check_status takes no fields.")
    return services.rpc_target(agent)


STATUS_CHECK = inline_serializer(
    "StatusCheck",
    {
        "reachable": serializers.BooleanField(),
        "version": serializers.CharField(allow_null=True),
        "running": serializers.ListField(child=serializers.IntegerField()),
        "error": serializers.CharField(required=False),
        "latency_ms": serializers.FloatField(),
        "checked_at": serializers.DateTimeField(),
        "status": serializers.CharField(),
    },
)


@csrf_exempt  # DRF's session authentication checks CSRF itself; tokens need none
async def check_status(request: HttpRequest, agent_id: int) -> HttpResponse:
    if request.method != "POST":
        return json_error("method_not_allowed", f"Method {request.method} not allowed.", 405)
    try:
        target = await run_db(_target, request, agent_id)
    except exceptions.APIException as exc:
        return error_response(exc)
    answer = await services.ask_status(target)
    answer["status"] = await run_db(services.record_status_check, agent_id, answer)
    return JsonResponse(answer)


class FleetCheckInput(StrictInputMixin, serializers.Serializer):
    targets = TargetsInput()


def _fleet_targets(request: HttpRequest) -> dict[str, Any]:
    """Authorize and validate a fleet-wide check: the agents as a run would resolve them."""
    user = authenticated_user(request)
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, RecursionError) as exc:
        raise exceptions.ParseError("The body is not JSON.") from exc
    data = FleetCheckInput(data=body)
    data.is_valid(raise_exception=True)
    targets = data.validated_data["targets"]
    agents = target_agents(user, targets)
    return {"agents": agents, "targets": services.rpc_targets(agents)}


@csrf_exempt
async def check_status_many(request: HttpRequest) -> HttpResponse:
    """`POST /api/agents/check_status/` `{targets}`: every target's reachability, asked
    concurrently; one row per agent (as check_status answers) and counts."""
    if request.method != "POST":
        return json_error("method_not_allowed", f"Method {request.method} not allowed.", 405)
    try:
        found = await run_db(_fleet_targets, request)
    except exceptions.APIException as exc:
        return error_response(exc)
    answers = await services.check_many(found["targets"])
    statuses = await run_db(services.record_status_checks, answers)
    rows = []
    for agent in found["agents"]:
        answer = answers[agent.pk]
        rows.append({"agent": agent.pk, "hostname": agent.hostname, **answer})
        rows[-1]["status"] = statuses[agent.pk]
    reachable = sum(row["reachable"] for row in rows)
    counts = {"total": len(rows), "reachable": reachable, "unreachable": len(rows) - reachable}
    return JsonResponse({"counts": counts, "results": rows})


class CheckStatusSchema(APIView):
    """check_status in the API schema. drf-spectacular documents DRF views only, and
    check_status must stay a native async view; this class describes it and serves nothing
    (the URL is routed to check_status itself)."""

    @extend_schema(
        operation_id="agents_check_status_create",
        request=None,
        responses={200: STATUS_CHECK},
        tags=["agents"],
    )
    def post(self, request: Request, agent_id: int) -> Response:
        raise exceptions.MethodNotAllowed("POST")


# What drf-spectacular's endpoint enumerator reads of a DRF view (APIView.as_view sets both).
check_status.cls = CheckStatusSchema  # type: ignore[attr-defined]
check_status.initkwargs = {}  # type: ignore[attr-defined]


class FleetCheckSchema(APIView):
    """check_status_many in the API schema (see CheckStatusSchema)."""

    @extend_schema(
        operation_id="agents_check_status_many",
        request=FleetCheckInput,
        responses={200: OpenApiResponse(description="counts and one status check per agent")},
        tags=["agents"],
    )
    def post(self, request: Request) -> Response:
        raise exceptions.MethodNotAllowed("POST")


check_status_many.cls = FleetCheckSchema  # type: ignore[attr-defined]
check_status_many.initkwargs = {}  # type: ignore[attr-defined]
