"""The agent long-poll, served without Django's request or DRF.

An idle fleet is mostly long-polls: 10,000 agents on 25 s polls open 400 polls a second and
hold 10,000. So while nothing is queued a poll costs a coroutine and no database work:
- the agent's credentials come from the in-process cache (tether.fleet.authentication);
- its heartbeat is noted and written in a batch (tether.fleet.heartbeats);
- whether it has work is known from notifications (tether.wakeups), kept in one set per
  process by the hub; the database is asked only when the set says so;
- one periodic query for the whole process (the hub's tick) catches what no notification
  announces: a lease that ran out, a cancel to send again, a writer that could not notify.
No held poll queries the database on a timer of its own.

tether.asgi hands the poll paths to `serve` (ASGI); the Django view in `agent_api` calls the
same `answer_poll` for in-process clients. Rules stay with their services: signing and the
legacy dialect in fleet.authentication, leases and cancels in services.claim_commands.
"""

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl

from django.conf import settings
from django.utils.encoding import escape_uri_path, iri_to_uri
from rest_framework import exceptions
from rest_framework.throttling import BaseThrottle

from tether import metrics, wakeups
from tether.db import run_db
from tether.errors import PayloadTooLarge, error_body, exception_handler
from tether.fleet import guard, heartbeats, nonces
from tether.fleet import services as fleet_services
from tether.fleet.agent_views import address_of
from tether.fleet.authentication import (
    Credential,
    cached_credential,
    check_credentials,
    credential_for,
    replayed,
    require_nonces,
)
from tether.fleet.models import Agent

from . import holding, services

log = logging.getLogger("tether.poll")

# The poll's paths; True: the original path, answered with a Deprecation header.
PATHS = {
    "/api/agents/poll_commands/": False,
    "/api/agents/poll/": False,
    "/api/agents/command/": True,
}
ROUTE = "/api/agents/poll_commands/"  # one label for the three paths in tether_requests_total
DEPRECATION_HEADERS = [
    (b"deprecation", b"true"),
    (b"link", b'</api/agents/poll_commands/>; rel="successor-version"'),
]


@dataclass
class PollRequest:
    """What a poll is answered from, whichever way it came in."""

    method: str
    path: str  # as the agent signed it: path and query string
    query: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    peer: str | None  # the agent's address, as the throttles see it


# ---------------------------------------------------------------------------------------------
# The hub: one per process
# ---------------------------------------------------------------------------------------------


class Hub:
    """What this process knows about work for agents, and its one periodic task: the
    heartbeat flush and, every POLL_RECHECK, the query for agents with work."""

    def __init__(self) -> None:
        # Agents that may have work. Trusted only once the first query has run (`ready`).
        self.work: set[int] = set()
        self.noted: set[int] = set()  # notified since the current query began
        self.ready = False
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.last_query = 0.0
        self.claims: list[tuple[int, asyncio.Future]] = []
        self.claiming = False
        self.claimer: asyncio.Task | None = None

    def observe(self, key: str) -> None:
        """Every notification (any thread): an agent with new work, or a cancel."""
        if key.startswith("agent:"):
            agent_id = int(key.removeprefix("agent:"))
            # `noted` first: a tick replacing `work` by `found | noted` in between keeps it.
            self.noted.add(agent_id)
            self.work.add(agent_id)

    def resync(self) -> None:
        """Notifications may have been missed: ask the database until the next query."""
        self.ready = False
        self.last_query = 0.0

    def may_have_work(self, agent_id: int) -> bool:
        return not self.ready or agent_id in self.work

    def taking(self, agent_id: int) -> None:
        """A poll is about to claim for the agent: a notification from now on is new. Safe
        because a notification always follows its commit: the claim then sees the row."""
        self.work.discard(agent_id)

    async def claim(self, agent_id: int) -> services.Delivery:
        """Claim for one poll, in a batch with every other poll claiming meanwhile: a run's
        release wakes hundreds of polls at once, and each claim alone would be a trip to the
        database thread and a transaction of its own."""
        self.taking(agent_id)
        future = asyncio.get_running_loop().create_future()
        self.claims.append((agent_id, future))
        if not self.claiming:
            self.claiming = True
            self.claimer = asyncio.get_running_loop().create_task(self._claim_batches())
        return await future

    async def _claim_batches(self) -> None:
        try:
            while self.claims:
                batch, self.claims = self.claims[:CLAIM_BATCH], self.claims[CLAIM_BATCH:]
                # One agent's two polls (a reconnect) must not both get its commands.
                agent_ids = list(dict.fromkeys(agent_id for agent_id, _ in batch))
                try:
                    deliveries = await run_db(services.claim_for_agents, agent_ids)
                except Exception:
                    # A deadlock or a dropped connection: the polls stay held, and the hub's
                    # next query finds the work again.
                    log.exception("claim for %d polls failed", len(agent_ids))
                    deliveries = {}
                    self.work.update(agent_ids)
                # An agent's newest poll gets its work: an older one may be a socket it left.
                for agent_id, future in reversed(batch):
                    delivery = deliveries.pop(agent_id, None) or services.Delivery([], [])
                    if not future.done():
                        future.set_result(delivery)
        finally:
            self.claiming = False

    def ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.loop is not loop:
            self.loop, self.ready, self.last_query = loop, False, 0.0
            self.task = loop.create_task(self._run(), name="tether-poll-hub")

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("poll hub tick failed")
            await asyncio.sleep(heartbeats.flush_interval())

    async def tick(self) -> None:
        query = time.monotonic() - self.last_query >= settings.POLL_RECHECK
        if query:
            self.noted = set()
            self.last_query = time.monotonic()
        found = await run_db(_tick, query)
        if found is None:
            return
        self.work = found | self.noted
        self.ready = True
        for agent_id in found:
            wakeups.notify(wakeups.agent_key(agent_id))


def _tick(query: bool) -> set[int] | None:
    """One trip to a database thread: write the batched heartbeats, and find the agents
    with work when it is time to."""
    heartbeats.flush()
    holding.flush()
    return services.agents_with_work() if query else None


# Polls claimed for in one trip to the database at most (bounded by SQLite's parameters).
CLAIM_BATCH = 500
hub = Hub()
wakeups.observe(hub.observe)
wakeups.on_resync(hub.resync)


# ---------------------------------------------------------------------------------------------
# Answering a poll
# ---------------------------------------------------------------------------------------------


def _params(query: Mapping[str, str]) -> tuple[float, str | None, int | None]:
    try:
        wait = float(query.get("wait") or 0)
        rpc_port = int(query["rpc_port"]) if query.get("rpc_port") else None
    except (ValueError, OverflowError) as exc:
        raise exceptions.ValidationError("wait and rpc_port must be numbers") from exc
    if wait != wait or wait < 0:  # NaN or negative
        raise exceptions.ValidationError("wait must be a number of seconds >= 0")
    if rpc_port is not None and not 0 <= rpc_port <= 65535:
        raise exceptions.ValidationError("rpc_port must be 0..65535")
    version = query.get("version") or None
    if version is not None and len(version) > Agent._meta.get_field("version").max_length:
        raise exceptions.ValidationError("version is too long")
    return min(wait, fleet_services.effective_long_poll_timeout()), version, rpc_port


def _open(
    agent: Agent, version: str | None, rpc_port: int | None, peer: str | None
) -> services.Delivery:
    fleet_services.record_heartbeat(agent=agent, version=version, rpc_port=rpc_port, address=peer)
    return services.claim_commands(agent=agent)


async def _credential(request: PollRequest) -> tuple[Credential, "asyncio.Future[bool] | None"]:
    """The polling agent's credential, and its nonce's check still under way (None when it
    is done): the poll awaits it (`nonces.confirmed`) before it hands out work or answers."""
    token = request.headers.get("x-agent-token", "")
    credential = cached_credential(token) or await run_db(credential_for, token)
    timestamp = request.headers.get("x-tether-timestamp", "")
    nonce = check_credentials(
        credential,
        method=request.method,
        path=request.path,
        timestamp=timestamp,
        signature=request.headers.get("x-tether-signature", ""),
        body=request.body,
        nonce=request.headers.get("x-tether-nonce", ""),
    )
    if not nonce:
        return credential, None
    verdict = nonces.check_soon(credential.agent.pk, nonce, timestamp)
    if verdict is False:
        raise replayed()
    if not credential.agent.sends_nonces:
        await run_db(require_nonces, credential)
    return credential, (None if verdict is True else verdict)


class Gone(Exception):
    """The agent hung up while its poll was held."""


def _observe_dispatch(delivery: services.Delivery) -> None:
    """Queue-to-delivery time of commands handed out for the first time (a delivery again
    after a lease ran out is not a dispatch)."""
    for command in delivery.commands:
        if command.delivery_count == 1:
            seconds = (command.delivered_at - command.created_at).total_seconds()
            metrics.DISPATCH_SECONDS.observe(seconds)


def _error(exc: exceptions.APIException) -> tuple[int, dict]:
    response = exception_handler(exc, {})
    assert response is not None
    return response.status_code, response.data


async def answer_poll(request: PollRequest, waiter: wakeups.Waiter) -> tuple[int, dict]:
    """Answer as soon as there is work (or a cancel) for the agent, else after `wait`
    seconds: (status, body). `waiter` is the caller's subscription, made before anything
    is read, so a notification in between is not lost. An address that failed to
    authenticate too often is refused first (tether.fleet.guard), and every 401 counts."""
    status, body = await _guarded_answer(request, waiter)
    if status == 401:
        await run_db(guard.note_failure, request.peer)
    return status, body


async def _guarded_answer(request: PollRequest, waiter: wakeups.Waiter) -> tuple[int, dict]:
    try:
        guard.refuse_blocked(request.peer)
        if request.method not in ("GET", "POST"):
            raise exceptions.MethodNotAllowed(request.method)
        if len(request.body) > settings.MAX_REQUEST_BYTES:
            raise PayloadTooLarge(settings.MAX_REQUEST_BYTES)
        credential, pending = await _credential(request)
        guard.refuse_polling_too_fast(credential.agent.pk)
        wait, version, rpc_port = _params(request.query)
        held = holding.parse(request.query.get("holding"))
    except exceptions.APIException as exc:
        return _error(exc)
    try:
        if held:  # a replay must not keep commands from being handed out again
            await _unreplayed(pending)
            holding.note(credential.agent.pk, held)
        return await _answer(request, waiter, credential.agent, pending, wait, version, rpc_port)
    except exceptions.AuthenticationFailed as exc:  # a replay, found out by the shared record
        return _error(exc)


async def _unreplayed(pending: "asyncio.Future[bool] | None", *, hurry: bool = True) -> None:
    """Before the poll counts as a sign of life, takes work or answers: its nonce must be new
    to every process (a replay must neither take work nor keep a dead agent online); at
    once when that is already known."""
    if not await nonces.confirmed(pending, hurry=hurry):
        raise replayed()


async def _answer(
    request: PollRequest,
    waiter: wakeups.Waiter,
    agent: Agent,
    pending: "asyncio.Future[bool] | None",
    wait: float,
    version: str | None,
    rpc_port: int | None,
) -> tuple[int, dict]:
    hub.ensure_running()
    wakeups.register(wakeups.agent_key(agent.pk), waiter)
    delivery = services.Delivery(commands=[], cancel=[])
    if heartbeats.needs_write(agent, version, rpc_port, request.peer):
        await _unreplayed(pending)
        hub.taking(agent.pk)
        delivery = await run_db(_open, agent, version, rpc_port, request.peer)
    else:
        # An idle poll's nonce may wait for its batch: the poll is held anyway.
        await _unreplayed(pending, hurry=hub.may_have_work(agent.pk))
        heartbeats.note(agent.pk)
        if hub.may_have_work(agent.pk):
            delivery = await hub.claim(agent.pk)
    deadline = time.monotonic() + wait
    with metrics.HELD_POLLS.track_inprogress():
        while not (delivery.commands or delivery.cancel):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await waiter.wait(remaining):
                break
            if getattr(waiter, "gone", False):
                raise Gone
            await _unreplayed(pending)
            delivery = await hub.claim(agent.pk)
    await _unreplayed(pending)
    if not (delivery.commands or delivery.cancel):
        guard.count_idle_poll(agent.pk)
    _observe_dispatch(delivery)
    if len(delivery.commands) >= services.CLAIM_LIMIT:
        hub.work.add(agent.pk)  # more may wait: the next poll asks at once
    return 200, {
        "commands": [services.as_delivered(c) for c in delivery.commands],
        "cancel": delivery.cancel,
        "config": fleet_services.agent_config(agent),
    }


# ---------------------------------------------------------------------------------------------
# The thin ASGI route
# ---------------------------------------------------------------------------------------------


def _request_from_scope(scope: dict, body: bytes) -> PollRequest:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers") or ():
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    query_string = (scope.get("query_string") or b"").decode("latin-1")
    path = escape_uri_path(scope["path"])  # as Django's get_full_path() gives it
    if query_string:
        path = f"{path}?{iri_to_uri(query_string)}"
    client = scope.get("client") or (None, None)
    # What DRF's throttles read of a request, so the address is the one they key on.
    ident = BaseThrottle().get_ident(
        SimpleNamespace(META={"REMOTE_ADDR": client[0] or ""}, headers=headers)
    )
    return PollRequest(
        method=scope.get("method", "GET"),
        path=path,
        query=dict(parse_qsl(query_string, keep_blank_values=True)),
        headers=headers,
        body=body,
        peer=address_of(ident),
    )


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The request body, or None when it runs past `limit` (then no more is read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Gone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _watch_disconnect(receive: Any, waiter: wakeups.Waiter) -> None:
    """Wake the held poll when the agent hangs up, so nothing is handed to a dead socket."""
    while (await receive())["type"] != "http.disconnect":
        pass
    waiter.gone = True  # type: ignore[attr-defined]
    waiter.event.set()


async def serve(scope: dict, receive: Any, send: Any) -> None:
    """ASGI entry for the poll paths (tether.asgi routes `PATHS` here)."""
    extra: list[tuple[bytes, bytes]] = []
    watcher: asyncio.Task | None = None
    try:
        with wakeups.subscribe() as waiter:
            limit = settings.MAX_REQUEST_BYTES
            length = dict(scope.get("headers") or ()).get(b"content-length", b"0")
            too_long = length.isdigit() and int(length) > limit
            body = None if too_long else await _read_body(receive, limit)
            if body is None:
                status, payload = 413, exception_handler(PayloadTooLarge(limit), {}).data
                extra = [(b"connection", b"close")]
            else:
                watcher = asyncio.ensure_future(_watch_disconnect(receive, waiter))
                status, payload = await answer_poll(_request_from_scope(scope, body), waiter)
    except Gone:
        return
    except Exception:
        # Answers its own errors; this is a bug: log it, show nothing of it.
        log.exception("poll failed: %s %s", scope.get("method"), scope.get("path"))
        status, payload = 500, error_body("server_error", "Internal server error.")
    finally:
        if watcher is not None:
            watcher.cancel()
    content = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(content)).encode()),
        *extra,
    ]
    if PATHS.get(scope["path"]):
        headers += DEPRECATION_HEADERS
    if status == 429:
        headers.append((b"retry-after", str(payload["error"]["retry_after"]).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
    metrics.observe_request(ROUTE, scope.get("method", "GET"), status)
