"""The one authentication class for every agent-facing view (`X-Agent-Token`)."""

import hmac
import time

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http import HttpRequest
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication

from . import credentials
from .models import Agent

REFUSAL = "Invalid or missing agent credentials."


class AgentTokenAuthentication(BaseAuthentication):
    """Resolves `X-Agent-Token` to an Agent (as `request.auth`) and checks the request
    signature of agents that registered as signing. Every refusal is the same 401, so the
    answer tells nothing about which tokens exist."""

    def authenticate(self, request: HttpRequest) -> tuple[AnonymousUser, Agent]:
        django_request = getattr(request, "_request", request)
        agent = authenticate_agent(django_request)
        return AnonymousUser(), agent

    def authenticate_header(self, request: HttpRequest) -> str:
        return "X-Agent-Token"


def authenticate_agent(request: HttpRequest) -> Agent:
    """Return the calling agent or raise AuthenticationFailed. Usable from async views
    through sync_to_async, so the long-poll shares the exact same check."""
    canonical = credentials.canonical_agent_token(request.headers.get("X-Agent-Token", ""))
    if canonical is None:
        raise exceptions.AuthenticationFailed(REFUSAL)
    try:
        agent = Agent.objects.get(token_hash=credentials.hash_token(canonical))
    except Agent.DoesNotExist as exc:
        raise exceptions.AuthenticationFailed(REFUSAL) from exc
    if agent.signs_requests:
        _check_signature(request, agent)
    elif not settings.ACCEPT_LEGACY_AGENTS:
        raise exceptions.AuthenticationFailed(REFUSAL)
    return agent


def _check_signature(request: HttpRequest, agent: Agent) -> None:
    timestamp = request.headers.get("X-Tether-Timestamp", "")
    signature = request.headers.get("X-Tether-Signature", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > settings.SIGNATURE_WINDOW:
        raise exceptions.AuthenticationFailed(REFUSAL)
    try:
        secret = credentials.decrypt(agent.secret_key_encrypted)
    except ValueError as exc:
        raise exceptions.AuthenticationFailed(REFUSAL) from exc
    expected = credentials.sign(
        secret, request.method or "GET", request.get_full_path(), timestamp, request.body
    )
    if not hmac.compare_digest(expected, signature):
        raise exceptions.AuthenticationFailed(REFUSAL)


class IsAgent:
    """Permission for agent views: authentication must have produced an Agent."""

    def has_permission(self, request: HttpRequest, view: object) -> bool:
        return isinstance(getattr(request, "auth", None), Agent)

    def has_object_permission(self, request: HttpRequest, view: object, obj: object) -> bool:
        return True
