"""Agent-facing fleet endpoints: register, poll (the long-poll), heartbeat, files."""

import hashlib
import ipaddress
import time
from typing import Any

from django.conf import settings
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import BaseThrottle, ScopedRateThrottle
from rest_framework.views import APIView

from tether import wakeups
from tether.agent_views import AgentAPIView, agent_endpoint, check_body_size, error_response
from tether.commands import services as command_services
from tether.db import run_db
from tether.deploy import services as deploy_services
from tether.errors import TetherError, json_error
from tether.pki.ca import pin_for_agents

from . import credentials, services
from .authentication import authenticate_agent
from .models import Agent

AGENT_FILES = ("main.py", "requirements.txt")


def peer_address(request: HttpRequest) -> str | None:
    """The agent's address as the throttles see it (X-Forwarded-For only behind NUM_PROXIES
    proxies): where the server reaches its RPC endpoint."""
    address = BaseThrottle().get_ident(request)
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None
    # A scoped IPv6 address loses its scope in the database: not a usable RPC target.
    return None if getattr(parsed, "scope_id", None) else str(parsed)


class RegisterInput(serializers.Serializer):
    server_token = serializers.CharField(max_length=200)
    hostname = serializers.CharField(max_length=255)
    version = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")
    os = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")
    arch = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")
    rpc_port = serializers.IntegerField(
        min_value=0, max_value=65535, required=False, allow_null=True
    )
    signing = serializers.ChoiceField(choices=["hmac-sha256"], required=False)


class RegisterView(APIView):
    """Exchange a server token for agent credentials (throttled per address)."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "register"
    agent_endpoint = True

    @extend_schema(
        request=RegisterInput,
        responses={
            201: inline_serializer(
                "Registration",
                {
                    "agent_id": serializers.IntegerField(),
                    "server_id": serializers.IntegerField(),
                    "token": serializers.CharField(),
                    "secret_key": serializers.CharField(),
                    "config": serializers.DictField(),
                    "heartbeat_mode": serializers.CharField(),
                },
            )
        },
        tags=["agent"],
    )
    def post(self, request: Request) -> Response:
        check_body_size(request, settings.MAX_REQUEST_BYTES)
        data = RegisterInput(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        token = fields.pop("server_token")
        server = services.server_for_token(token)
        # An SSH install hands the agent its deployment's registration token instead.
        enrollment = None if server else deploy_services.deployment_for_enrollment_token(token)
        if enrollment is not None:
            server = enrollment.server
        if server is None:
            raise TetherError(
                "Invalid server token.", code="authentication_failed", status_code=401
            )
        registration = services.register_agent(
            server=server,
            signing=fields.pop("signing", None) == "hmac-sha256",
            address=peer_address(request),
            **fields,
        )
        agent = registration.agent
        if enrollment is not None:
            deploy_services.record_enrolled_agent(enrollment, agent)
        return Response(
            {
                "agent_id": agent.pk,
                "server_id": server.pk,
                "token": registration.token,
                "secret_key": registration.secret_key,
                "rpc_port": agent.rpc_port,
                "config": services.agent_config(agent),
                "heartbeat_mode": "push",
                "ca_certificate": pin_for_agents(),
            },
            status=status.HTTP_201_CREATED,
        )


class HeartbeatInput(serializers.Serializer):
    status = serializers.CharField(max_length=32, required=False, allow_blank=True)
    version = serializers.CharField(max_length=64, required=False, allow_blank=True)
    rpc_port = serializers.IntegerField(
        min_value=0, max_value=65535, required=False, allow_null=True
    )


class HeartbeatView(AgentAPIView):
    """The older dialect's heartbeat without fetching commands."""

    @extend_schema(request=HeartbeatInput, responses={200: dict}, tags=["agent"])
    def post(self, request: Request) -> Response:
        data = HeartbeatInput(data=request.data)
        data.is_valid(raise_exception=True)
        agent = self.get_agent()
        services.record_heartbeat(
            agent=agent,
            version=data.validated_data.get("version"),
            rpc_port=data.validated_data.get("rpc_port"),
            address=peer_address(request),
        )
        return Response({"status": "ok", "config": services.agent_config(agent)})


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
    wait = min(wait, services.effective_long_poll_timeout())
    return wait, (request.GET.get("version") or None), rpc_port


def _open_poll(
    request: HttpRequest, waiter: wakeups.Waiter
) -> tuple[Agent, float, command_services.Delivery]:
    """Authenticate, subscribe to wake-ups, record the heartbeat and claim work: one trip
    to the database thread. Subscribing before the claim means a command queued in between
    still wakes the poll."""
    check_body_size(request, settings.MAX_REQUEST_BYTES)
    agent = authenticate_agent(request)
    wait, version, rpc_port = _poll_params(request)
    wakeups.register(wakeups.agent_key(agent.pk), waiter)
    services.record_heartbeat(
        agent=agent, version=version, rpc_port=rpc_port, address=peer_address(request)
    )
    return agent, wait, command_services.claim_commands(agent=agent)


def _poll_answer(agent: Agent, delivery: command_services.Delivery) -> dict[str, Any]:
    return {
        "commands": [command_services.as_delivered(c) for c in delivery.commands],
        "cancel": delivery.cancel,
        "config": services.agent_config(agent),
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
            delivery = await run_db(command_services.claim_commands, agent=agent)
    return JsonResponse(_poll_answer(agent, delivery))


@agent_endpoint
@csrf_exempt
async def deprecated_command_poll(request: HttpRequest) -> HttpResponse:
    """`POST /api/agents/command/`: the original poll path, kept with a Deprecation header."""
    response = await poll_commands(request)
    response["Deprecation"] = "true"
    response["Link"] = '</api/agents/poll_commands/>; rel="successor-version"'
    return response


class ManifestView(AgentAPIView):
    """What an upgrade installs, signed with the asking agent's own secret key: a copy of the
    files that was altered on the way (or served by an impostor) fails the agent's check."""

    @extend_schema(responses={200: dict}, tags=["agent"])
    def get(self, request: Request) -> Response:
        agent = self.get_agent()
        files = {}
        for name in AGENT_FILES:
            path = settings.AGENT_DIR / name
            if path.is_file():
                data = path.read_bytes()
                files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        manifest = {
            "agent_id": agent.pk,
            "version": deploy_services.agent_version(),
            "files": files,
            "issued_at": int(time.time()),
        }
        secret = credentials.decrypt(agent.secret_key_encrypted)
        return Response(
            {"manifest": manifest, "signature": credentials.sign_document(secret, manifest)}
        )


@agent_endpoint
def agent_file(request: HttpRequest, filename: str) -> HttpResponse:
    """Serve the agent's own files, by exact name only (no paths, no other files)."""
    if request.method != "GET":
        return json_error("method_not_allowed", f"Method {request.method} not allowed.", 405)
    if filename not in AGENT_FILES:
        return json_error("not_found", "Not found.", 404)
    path = settings.AGENT_DIR / filename
    if not path.is_file():
        return json_error("not_found", "Not found.", 404)
    return FileResponse(path.open("rb"), content_type="text/plain; charset=utf-8")
