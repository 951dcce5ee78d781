"""A fleet at the size the pages and lists must hold (docs/architecture.md, issue 12): rows
written with bulk_create in a few statements, so a test class builds 10,000 agents in about a
second, and a query budget that says how many queries a request may make, whatever the size.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tether.fleet.models import Agent, Server

FLEET_SIZE = 10_000
# Every tenth agent is offline and every tenth pending; the rest are online.
STATUSES = ["online"] * 8 + ["offline", "pending"]
AGENTS_PER_SERVER = 10


def bulk_fleet(owner: Any, size: int = FLEET_SIZE, prefix: str = "node") -> list[Agent]:
    """`size` agents of `owner`, ten per server (`{prefix}-srv-0000`...: a server per agent
    would double the time spent here for nothing a list does differently), named
    `{prefix}-00000`...; agent n is tagged "even"/"odd" and "rack-{n % 50}", signs its
    requests when n is even, and last beat n seconds ago."""
    now = timezone.now()
    servers = Server.objects.bulk_create(
        Server(
            owner=owner, name=f"{prefix}-srv-{n:04d}", host="10.0.0.1", token_hash=f"{prefix}{n}"
        )
        for n in range(-(-size // AGENTS_PER_SERVER))
    )
    return Agent.objects.bulk_create(
        Agent(
            server=servers[n // AGENTS_PER_SERVER],
            hostname=f"{prefix}-{n:05d}",
            version="1.0.0",
            status=STATUSES[n % len(STATUSES)],
            tags=["odd" if n % 2 else "even", f"rack-{n % 50}"],
            signs_requests=n % 2 == 0,
            last_heartbeat=now - timedelta(seconds=n),
            registered_at=now,
            token_hash=f"{prefix}{n}",
            secret_key_encrypted="-",
        )
        for n in range(size)
    )


class QueryBudgetMixin:
    """For TestCase classes."""

    @contextmanager
    def assertMaxQueries(self: Any, budget: int) -> Iterator[CaptureQueriesContext]:
        """At most `budget` queries in the block: a query per row (a select_related or only()
        dropped) blows any budget at this size. The queries are listed when it fails."""
        with CaptureQueriesContext(connection) as captured:
            yield captured
        made = [query["sql"] for query in captured.captured_queries]
        self.assertLessEqual(
            len(made), budget, f"{len(made)} queries, budget {budget}:\n" + "\n".join(made[:20])
        )
