"""`GET /api/deployments/{id}/stream/`: the log as it grows (`log` events with the text and
its character offset), `status` on each change, then `end` with the final status."""

import time
from collections.abc import AsyncIterator

from django.conf import settings

from tether import wakeups
from tether.db import run_db
from tether.sse import KEEPALIVE, KEEPALIVE_SECONDS, event

from .. import services
from ..models import Deployment


def _read(deployment_id: int) -> Deployment:
    return Deployment.objects.get(pk=deployment_id)


async def deployment_events(deployment_id: int) -> AsyncIterator[str]:
    sent = 0
    last_status = None
    last_sent = time.monotonic()
    with wakeups.subscribe(services.deployment_key(deployment_id)) as waiter:
        while True:
            deployment = await run_db(_read, deployment_id)
            if len(deployment.log) > sent:
                yield event("log", {"offset": sent, "data": deployment.log[sent:]})
                sent = len(deployment.log)
                last_sent = time.monotonic()
            if deployment.status != last_status:
                last_status = deployment.status
                yield event("status", {"status": deployment.status})
                last_sent = time.monotonic()
            if deployment.status in services.FINAL:
                yield event("end", {"id": deployment.pk, "status": deployment.status})
                return
            await waiter.wait(settings.POLL_RECHECK)
            if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
                yield KEEPALIVE
                last_sent = time.monotonic()
