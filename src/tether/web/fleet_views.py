"""The fleet page and the fragment it polls, at fleet size.

The page shows one page of agents (FLEET_PAGE rows), filtered and counted by the database,
from a fixed number of queries whatever the fleet's size. Every open page asks for its
fragment every few seconds; the fragment carries a fingerprint of what it shows, sent back
with the next poll, and a poll whose fingerprint still holds is answered 204 without
rendering anything (htmx then leaves the page as it is).

What the fingerprint leaves out is an online agent's heartbeat time: heartbeats arrive every
few seconds from every agent (and may be written in batches), so keying on them would make
every page "changed" at every poll. An online agent has been heard from within the offline
threshold (the sweep says so by leaving it online), and its row says just that; the rows of
agents not online show their last heartbeat, which then changes only with their status, and
the page's script moves their "N min ago" on by itself.
"""

import hashlib
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.paginator import Page, Paginator
from django.db.models import F, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.functional import cached_property
from django.views.decorators.http import require_GET

from tether.fleet.models import Agent
from tether.fleet.selectors import AgentFilter, agents_visible_to, count_by_status

FLEET_PAGE = 100  # agents per page of the fleet page (and per poll of its fragment)
FILTERS = ("status", "q", "tag")
# What a listed agent shows, and nothing else: the pages load no credentials, keys or
# addresses. The fleet's rows read these as tuples (with "server_name"): no model is built for
# a poll; the run form's picker reads them as models (with the server's name).
LISTED = ("id", "hostname", "status", "version", "last_heartbeat", "tags")


class CountedPaginator(Paginator):
    """A paginator told how many rows match (counted in count_by_status's pass) instead of
    counting them in a query of its own."""

    def __init__(self, object_list: QuerySet, per_page: int, *, count: int) -> None:
        super().__init__(object_list, per_page)
        self._known_count = count

    @cached_property
    def count(self) -> int:
        return self._known_count


def fleet_filter(request: HttpRequest) -> AgentFilter:
    """The fleet page's filters are the API's (AgentFilter); a status the page does not know
    is left out rather than refused."""
    status = request.GET.get("status", "")
    return AgentFilter(
        status=status if status in Agent.Status.values else "",
        search=request.GET.get("q", "").strip(),
        tag=request.GET.get("tag", "").strip(),
    )


def listed_agents(request: HttpRequest) -> QuerySet[Agent]:
    """The user's agents as models that hold what a list shows (the run form's picker)."""
    return agents_visible_to(request.user).only(*LISTED, "server", "server__name")


def filtered_agents(request: HttpRequest) -> QuerySet[Agent]:
    """The user's agents that pass the page's filters, by hostname (the run form's picker
    filters alike)."""
    return fleet_filter(request).apply(listed_agents(request)).order_by("hostname", "id")


def fingerprint(filters: dict[str, str], page: Page, counts: dict[str, int]) -> str:
    """A digest of everything the fragment shows: the filters, the page, the counters and
    each row as displayed (an online agent's heartbeat time left out: see the module's
    docstring). Equal digests render equal fragments."""
    rows = [
        row._replace(last_heartbeat=None) if row.status == Agent.Status.ONLINE else row
        for row in page
    ]
    shown = (sorted(filters.items()), page.number, page.paginator.num_pages, counts, rows)
    return hashlib.blake2b(repr(shown).encode(), digest_size=16).hexdigest()


def fleet_context(request: HttpRequest) -> dict[str, Any]:
    """The counters (one aggregate, which also counts the rows the filters match) and one
    page of rows (one query, read as tuples): two queries, whatever the fleet's size."""
    chosen = fleet_filter(request)
    visible = agents_visible_to(request.user)
    counts = count_by_status(visible, matching=chosen.q())
    rows = (
        chosen.apply(visible)
        .order_by("hostname", "id")
        .annotate(server_name=F("server__name"))
        .values_list(*LISTED, "server_name", named=True)
    )
    page = CountedPaginator(rows, FLEET_PAGE, count=counts["matching"]).get_page(
        request.GET.get("page")
    )
    filters = {key: request.GET.get(key, "") for key in FILTERS}
    return {
        "agents": page,
        "page": page,
        "counts": counts,
        "statuses": Agent.Status.values,
        "filters": filters,
        "fingerprint": fingerprint(filters, page, counts),
        "now": timezone.now(),
    }


@login_required
@require_GET
def fleet(request: HttpRequest) -> HttpResponse:
    return render(request, "web/fleet.html", fleet_context(request))


@login_required
@require_GET
def fleet_rows(request: HttpRequest) -> HttpResponse:
    """The fragment the fleet page polls: 204 (nothing to redraw) while the fingerprint the
    page sends back (`seen`) still holds, the counters and a page of rows otherwise."""
    context = fleet_context(request)
    if request.GET.get("seen") == context["fingerprint"]:
        return HttpResponse(status=204)
    return render(request, "web/_fleet_rows.html", context)
