"""The one authentication class for every agent-facing view (`X-Agent-Token`)."""

import copy
import hmac
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http import HttpRequest
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication

from tether import wakeups

from . import credentials, nonces
from .models import Agent

REFUSAL = "Invalid or missing agent credentials."
# A replay is told apart (its sender proved it holds the key, or replayed what did): an agent
# that meets it (a proxy that retried its request) signs again rather than registering again.
REPLAYED = "This request was seen before (its nonce is used): sign it again with a new nonce."


def replayed() -> exceptions.AuthenticationFailed:
    return exceptions.AuthenticationFailed(REPLAYED, code="replayed")


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
    """Return the calling agent or raise AuthenticationFailed: the check every agent view
    shares (the long-poll's thin route calls `check_credentials` with the same parts)."""
    credential = credential_for(request.headers.get("X-Agent-Token", ""))
    timestamp = request.headers.get("X-Tether-Timestamp", "")
    nonce = check_credentials(
        credential,
        method=request.method or "GET",
        path=request.get_full_path(),
        timestamp=timestamp,
        signature=request.headers.get("X-Tether-Signature", ""),
        body=request.body,
        nonce=request.headers.get("X-Tether-Nonce", ""),
    )
    if nonce:
        if not nonces.remember(credential.agent.pk, nonce, timestamp):
            raise replayed()
        if not credential.agent.sends_nonces:
            require_nonces(credential)
    # A copy: a view may change its agent; the cached one stays as the database has it.
    return copy.copy(credential.agent)


def require_nonces(credential: "Credential") -> None:
    """The agent signed with a nonce: from now on it must (DESIGN §6). Once per agent."""
    credential.agent.sends_nonces = True
    Agent.objects.filter(pk=credential.agent.pk).update(sends_nonces=True)
    credentials_changed(credential.agent.pk)


# ---------------------------------------------------------------------------------------------
# The credential cache
# ---------------------------------------------------------------------------------------------


@dataclass
class Credential:
    """An agent as its token finds it, with its signing secret decrypted once."""

    agent: Agent
    secret: str | None
    loaded: float = field(default_factory=time.monotonic)


# token hash -> credential. Every agent call looks here first: an idle fleet's polls then
# authenticate without the database. An entry goes when its agent's credentials change
# (auth_key notifications, from any process on PostgreSQL), when the listener may have missed
# one, and after CACHE_TTL at the latest (a writer that cannot notify: another process on
# SQLite).
_cache: dict[str, Credential] = {}
_by_agent: dict[int, set[str]] = {}  # agent id -> its cached token hashes
_cache_lock = threading.Lock()
# Bumped by every forget: a credential read from the database before a forget is not cached
# after it (the forget found nothing to drop, and the row it read may be the old one).
_generation = 0
CACHE_TTL = 300.0
CACHE_MAX = 100_000


def cached_credential(token: str) -> Credential | None:
    """The credential for `token` if this process has it fresh; never touches the database.
    None for a miss, which `credential_for` (on a database thread) resolves."""
    credential = _cache.get(_token_hash(token))
    if credential is None or time.monotonic() - credential.loaded > CACHE_TTL:
        return None
    return credential


def credential_for(token: str) -> Credential:
    """The credential for `token`, from the cache or the database; AuthenticationFailed for
    an unknown or malformed token (the same refusal either way)."""
    token_hash = _token_hash(token)
    credential = _cache.get(token_hash)
    if credential is not None and time.monotonic() - credential.loaded <= CACHE_TTL:
        return credential
    if not token_hash:
        raise exceptions.AuthenticationFailed(REFUSAL)
    generation = _generation
    try:
        agent = Agent.objects.get(token_hash=token_hash)
    except Agent.DoesNotExist as exc:
        raise exceptions.AuthenticationFailed(REFUSAL) from exc
    secret = None
    if agent.signs_requests:
        try:
            secret = credentials.decrypt(agent.secret_key_encrypted)
        except ValueError as exc:  # SECRET_KEY changed: nothing this agent sends can be checked
            raise exceptions.AuthenticationFailed(REFUSAL) from exc
    credential = Credential(agent=agent, secret=secret)
    with _cache_lock:
        if generation != _generation:
            return credential  # the agent may have changed since the read: not cached
        if len(_cache) >= CACHE_MAX:
            _cache.clear()
            _by_agent.clear()
        _cache[token_hash] = credential
        _by_agent.setdefault(agent.pk, set()).add(token_hash)
    return credential


def forget_agent(agent_id: int) -> None:
    """Drop every cached credential of the agent (its token was rotated, it was deleted)."""
    global _generation
    with _cache_lock:
        _generation += 1
        for token_hash in _by_agent.pop(agent_id, ()):
            _cache.pop(token_hash, None)


def clear_cache() -> None:
    global _generation
    with _cache_lock:
        _generation += 1
        _cache.clear()
        _by_agent.clear()


def credentials_changed(agent_id: int) -> None:
    """Tell every process to forget the agent's cached credential once this commits: call it
    after changing what a credential holds (CACHED_FIELDS) with a queryset update(); save()
    and delete() tell by themselves (signals, connected in FleetConfig.ready)."""
    wakeups.notify_on_commit(wakeups.auth_key(agent_id))


# What a cached credential holds: a save touching any of these makes every process forget it.
CACHED_FIELDS = frozenset(
    {"token_hash", "secret_key_encrypted", "signs_requests", "sends_nonces", "verify_ssl"}
)


def agent_saved(sender: Any, instance: Agent, update_fields: Any = None, **kwargs: Any) -> None:
    if update_fields is None or CACHED_FIELDS & set(update_fields):
        credentials_changed(instance.pk)


def agent_deleted(sender: Any, instance: Agent, **kwargs: Any) -> None:
    credentials_changed(instance.pk)


def forget_on_notify(key: str) -> None:
    if key.startswith("auth:"):
        forget_agent(int(key.removeprefix("auth:")))


def _token_hash(token: str) -> str:
    canonical = credentials.canonical_agent_token(token)
    return credentials.hash_token(canonical) if canonical is not None else ""


# A nonce as agents send it: 16 to 64 characters a header and a log line carry safely.
NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")


def check_credentials(
    credential: Credential,
    *,
    method: str,
    path: str,
    timestamp: str,
    signature: str,
    body: bytes,
    nonce: str = "",
) -> str:
    """Refuse what the agent may not send: an unsigned or badly signed request from an agent
    that registered as signing, a timestamp outside the window (past or future), a missing
    nonce from an agent that sends them, any request from a legacy agent once they are
    refused. Returns the nonce the caller must remember before acting ("" when none): a
    replay is refused there, by `nonces`."""
    if credential.secret is None:
        if credential.agent.signs_requests or not settings.ACCEPT_LEGACY_AGENTS:
            raise exceptions.AuthenticationFailed(REFUSAL)
        return ""
    # ASCII digits only ("²" is a digit to str.isdigit, not to int), and a sane length.
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise exceptions.AuthenticationFailed(REFUSAL)
    age = time.time() - int(timestamp)
    if age > settings.SIGNATURE_WINDOW or -age > settings.SIGNATURE_FUTURE:
        raise exceptions.AuthenticationFailed(REFUSAL)
    if nonce:
        if not NONCE.fullmatch(nonce):
            raise exceptions.AuthenticationFailed(REFUSAL)
    elif credential.agent.sends_nonces:
        raise exceptions.AuthenticationFailed(REFUSAL)
    expected = credentials.sign(credential.secret, method, path, timestamp, body, nonce)
    if not hmac.compare_digest(expected, signature):
        raise exceptions.AuthenticationFailed(REFUSAL)
    return nonce


class IsAgent:
    """Permission for agent views: authentication must have produced an Agent."""

    def has_permission(self, request: HttpRequest, view: object) -> bool:
        return isinstance(getattr(request, "auth", None), Agent)

    def has_object_permission(self, request: HttpRequest, view: object, obj: object) -> bool:
        return True
