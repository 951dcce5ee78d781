"""`POST /api/agents/{id}/check_status/`: a native async view, so that a status check waits on
a socket, not on one of the server's threads (DRF views run on Django's one sync thread)."""

import json
import time
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions

from tether.accounts.selectors import agents_visible_to
from tether.agent_views import error_response
from tether.db import run_db
from tether.errors import json_error
from tether.sse import authenticated_user

from . import rpc, services


def _target(request: HttpRequest, agent_id: int) -> rpc.Target | None:
    """Authorize, refuse any input, and read what the call needs; None: no RPC endpoint."""
    user = authenticated_user(request)
    agent = agents_visible_to(user).filter(pk=agent_id).first()
    if agent is None:
        raise exceptions.NotFound()
    try:
        body = json.loads(request.body or b"{}")
    except ValueError as exc:
        raise exceptions.ParseError("The body is not JSON.") from exc
    if body != {}:
        raise exceptions.ValidationError("check_status takes no fields.")
    return services.rpc_target(agent)


@csrf_exempt  # DRF's session authentication checks CSRF itself; tokens need none
async def check_status(request: HttpRequest, agent_id: int) -> HttpResponse:
    if request.method != "POST":
        return json_error("method_not_allowed", f"Method {request.method} not allowed.", 405)
    try:
        target = await run_db(_target, request, agent_id)
    except exceptions.APIException as exc:
        return error_response(exc)
    started = time.monotonic()
    answer: dict[str, Any] = {"reachable": False, "version": None, "running": []}
    if target is None:
        answer["error"] = "the agent has no RPC endpoint (no rpc_port or no certificate yet)"
    else:
        try:
            status, data = await rpc.call(target, "GET", "/status", settings.RPC_TIMEOUT)
        except rpc.RpcError as exc:
            answer["error"] = str(exc)
        else:
            if status == 200:
                answer.update(
                    reachable=True, version=data.get("version"), running=data.get("running", [])
                )
            else:
                answer["error"] = f"the agent answered HTTP {status}"
    answer["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    answer["checked_at"] = timezone.now().isoformat()
    answer["status"] = await run_db(services.record_status_check, agent_id, answer)
    return JsonResponse(answer)
