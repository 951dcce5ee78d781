"""`GET /api/deployments/{id}/stream/`: the log as it grows (`log` events with the text and
its character offset), `status` on each change, then `end` with the final status."""

from collections.abc import AsyncIterator

from tether import wakeups
from tether.db import run_db
from tether.sse import Pause, event

from .. import services
from ..models import Deployment


def _read(deployment_id: int) -> Deployment:
    return Deployment.objects.get(pk=deployment_id)


async def deployment_events(deployment_id: int) -> AsyncIterator[str]:
    sent = 0
    last_status = None
    pause = Pause()
    with wakeups.subscribe(services.deployment_key(deployment_id)) as waiter:
        while True:
            deployment = await run_db(_read, deployment_id)
            if len(deployment.log) > sent:
                yield event("log", {"offset": sent, "data": deployment.log[sent:]})
                sent = len(deployment.log)
                pause.sent()
            if deployment.status != last_status:
                last_status = deployment.status
                yield event("status", {"status": deployment.status})
                pause.sent()
            if deployment.status in services.FINAL:
                yield event("end", {"id": deployment.pk, "status": deployment.status})
                return
            if keepalive := await pause.wait(waiter):
                yield keepalive
