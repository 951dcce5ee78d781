"""The periodic sweep that runs inside `tether serve`: offline agents, lost commands, queued
commands past their expiry, deployments past their deadline, agent certificates near expiry."""

import asyncio
import logging

from django.conf import settings

from tether.db import run_db

log = logging.getLogger("tether.sweeper")


def sweep_once() -> tuple[int, int]:
    from tether.commands.runs import advance_open_runs, skip_unreachable_targets
    from tether.commands.services import expire_queued_commands, mark_lost_commands
    from tether.deploy.rollouts import advance_open_rollouts
    from tether.deploy.services import expire_deployments
    from tether.fleet import nonces
    from tether.fleet.services import mark_offline_agents
    from tether.pki.services import renew_expiring

    offline, lost = mark_offline_agents(), mark_lost_commands()
    # Runs move on with each target's end; this only catches one a crash left behind.
    skip_unreachable_targets()
    # After the skip: an `offline: skip` run's target whose agent left ends skipped, not expired.
    commands_expired = expire_queued_commands()
    if commands_expired:
        log.info("sweep: %d queued command(s) expired", commands_expired)
    advance_open_runs()
    advance_open_rollouts()
    expired = expire_deployments()
    if expired:
        log.info("sweep: %d deployment(s) past their deadline", expired)
    renewed = renew_expiring()
    if renewed:
        log.info("sweep: %d agent certificate(s) renewed", renewed)
    nonces.prune()
    return offline, lost


async def run_sweeper() -> None:
    """Mark offline agents and lost commands every SWEEP_INTERVAL seconds, forever.
    A failed sweep is logged and retried on the next tick; it never stops the server."""
    while True:
        await asyncio.sleep(settings.SWEEP_INTERVAL)
        try:
            offline, lost = await run_db(sweep_once)
        except Exception:
            log.exception("sweep failed")
            continue
        if offline or lost:
            log.info("sweep: %d agent(s) offline, %d command(s) lost", offline, lost)
