"""`GET /metrics`: the server's instruments (tether.metrics) and the fleet as the database
sees it, in Prometheus text format, for those allowed to scrape (docs/metrics.md).

Project wiring: it reads the fleet and the commands through their selectors, so it sits
above every app. The request-counting middleware is here too: it is how the human API and
the pages are counted (agent endpoints skip Django's middleware; the thin route counts its
own through `tether.metrics.observe_request`).
"""

import ipaddress
from collections.abc import Awaitable, Callable, Iterator

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.crypto import constant_time_compare
from django.utils.decorators import sync_and_async_middleware
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tether import metrics
from tether.commands.models import Command
from tether.commands.selectors import commands_by_status
from tether.errors import json_error
from tether.fleet.models import Agent
from tether.fleet.selectors import count_by_status


class FleetCollector(Collector):
    """Agents and commands by status and the queue's depth, read when scraped (one query
    each for agents and commands), so every process reports the same truth and nothing has
    to be kept in step with the rows."""

    def collect(self) -> Iterator[Metric]:
        agents = GaugeMetricFamily("tether_agents", "Agents by status.", labels=["status"])
        by_status = count_by_status(Agent.objects.all())
        for status in Agent.Status.values:
            agents.add_metric([status], by_status[status])
        yield agents

        commands = GaugeMetricFamily(
            "tether_commands", "Commands by status (all kept rows).", labels=["status"]
        )
        command_counts = commands_by_status()
        for status, n in command_counts.items():
            commands.add_metric([status], n)
        yield commands

        yield GaugeMetricFamily(
            "tether_queue_depth",
            "Commands queued and not yet delivered to their agent.",
            value=command_counts[Command.Status.QUEUED],
        )


class _Scrape(Collector):
    """What one scrape shows: the server's instruments, then the fleet."""

    def collect(self) -> Iterator[Metric]:
        yield from metrics.process_metrics().collect()
        yield from FleetCollector().collect()


def _peer_allowed(request: HttpRequest) -> bool:
    """Whether the connection's own peer (REMOTE_ADDR; a header names whoever the client
    likes) is in TETHER_METRICS_ALLOW."""
    try:
        peer = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped:
        peer = peer.ipv4_mapped  # an IPv4 client of a dual-stack socket
    return any(peer in network for network in settings.METRICS_ALLOW)


def _token_allowed(request: HttpRequest) -> bool:
    """Whether the request carries `Authorization: Bearer TETHER_METRICS_TOKEN`; with no token
    configured, nothing does."""
    if not settings.METRICS_TOKEN:
        return False
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and constant_time_compare(
        given.strip(), settings.METRICS_TOKEN
    )


def scrape_allowed(request: HttpRequest) -> bool:
    return _peer_allowed(request) or _token_allowed(request)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The scrape. Refused alike whatever was missing (the network or the token), so a
    refusal says nothing about which one is configured."""
    if not scrape_allowed(request):
        return json_error("permission_denied", "Not allowed to read the metrics.", 403)
    if request.method not in ("GET", "HEAD"):
        response = json_error("method_not_allowed", f"Method {request.method} not allowed.", 405)
        response["Allow"] = "GET, HEAD"
        return response
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(_Scrape()), content_type=content_type)


Handler = Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]


def _observe(request: HttpRequest, response: HttpResponse) -> None:
    match = request.resolver_match
    metrics.observe_request(match.route if match else None, request.method, response.status_code)


@sync_and_async_middleware
def request_metrics(get_response: Handler) -> Handler:
    """Count every answered request of the human API and the pages by URL pattern, method and
    status. First in MIDDLEWARE, so that redirects and refusals by the others count too; both
    sync and async, so that it adds no thread hop to an async stack."""
    if iscoroutinefunction(get_response):

        async def middleware_async(request: HttpRequest) -> HttpResponse:
            response = await get_response(request)
            _observe(request, response)
            return response

        return middleware_async

    def middleware(request: HttpRequest) -> HttpResponse:
        response = get_response(request)
        _observe(request, response)
        return response

    return middleware
