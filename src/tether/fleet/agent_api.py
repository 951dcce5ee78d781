"""Agent-facing fleet endpoints: register, the older dialect's heartbeat, the agent's files
and the signed upgrade manifest. (The poll is the command queue's: commands/agent_api.py.)"""

import hashlib
import time

from django.conf import settings
from django.http import FileResponse, HttpRequest, HttpResponse
from django.urls import path
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from tether.accounts.origin import request_origin
from tether.accounts.services import audit
from tether.errors import json_error

from . import credentials, heartbeats, services
from .agent_files import AGENT_FILES, agent_version
from .agent_views import AgentAPIView, agent_endpoint, check_body_size, peer_address

IDENTITY = r"^[A-Za-z0-9_-]{16,64}\Z"


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
    # Tether's agent (agent/main.py machine_identity); the original dialect sends neither.
    machine_id = serializers.RegexField(IDENTITY, required=False, allow_blank=True, default="")
    instance_id = serializers.RegexField(IDENTITY, required=False, allow_blank=True, default="")

    def validate(self, data: dict) -> dict:
        if data.get("machine_id") and not data.get("instance_id"):
            raise serializers.ValidationError({"instance_id": "required with machine_id"})
        return data


class RegisterView(APIView):
    """Exchange a server token for agent credentials (throttled per address)."""

    authentication_classes: list = []
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
        registration = services.register_with_token(
            token=fields.pop("server_token"),
            signing=fields.pop("signing", None) == "hmac-sha256",
            address=peer_address(request),
            **fields,
        )
        _audit_registration(request, registration)
        answer = services.registration_answer(registration)
        return Response(answer, status=status.HTTP_201_CREATED)


def _audit_registration(request: Request, registration: services.Registration) -> None:
    """The audit log's line for a registration: no human actor, where from (the event's
    address), and whether it made a new agent or rotated an existing one's credentials (an
    existing row was created before this registration's time)."""
    agent = registration.agent
    with request_origin(request):
        audit(
            user=None,
            action="agent.register",
            target=agent,
            server=agent.server_id,
            hostname=agent.hostname,
            new=agent.created_at >= agent.registered_at,
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
        heartbeats.sign_of_life(
            agent=agent,
            version=data.validated_data.get("version"),
            rpc_port=data.validated_data.get("rpc_port"),
            address=peer_address(request),
        )
        return Response({"status": "ok", "config": services.agent_config(agent)})


class ManifestView(AgentAPIView):
    """What an upgrade installs, signed with the asking agent's own secret key: a copy of the
    files that was altered on the way (or served by an impostor) fails the agent's check."""

    @extend_schema(responses={200: dict}, tags=["agent"])
    def get(self, request: Request) -> Response:
        agent = self.get_agent()
        files = {}
        for name in AGENT_FILES:
            file = settings.AGENT_DIR / name
            if file.is_file():
                data = file.read_bytes()
                files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        manifest = {
            "agent_id": agent.pk,
            "version": agent_version(),
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
    file = settings.AGENT_DIR / filename
    if not file.is_file():
        return json_error("not_found", "Not found.", 404)
    return FileResponse(file.open("rb"), content_type="text/plain; charset=utf-8")


# Mounted at /api/agents/ (tether.urls).
urlpatterns = [
    path("register/", RegisterView.as_view()),
    path("heartbeat/", HeartbeatView.as_view()),
    path("files/manifest.json/", ManifestView.as_view()),
    path("files/<str:filename>/", agent_file),
]
