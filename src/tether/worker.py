"""The background-task worker: threads inside `tether serve` by default, or its own process
(`tether worker`) when deployments should not share the web server's CPU."""

import logging
import threading

from django.conf import settings
from django.utils.crypto import get_random_string
from django_tasks_db.management.commands.db_worker import Worker

log = logging.getLogger("tether.worker")


def new_worker() -> Worker:
    return Worker(
        queue_names=["*"],
        interval=settings.WORKER_INTERVAL,
        batch=False,
        backend_name="default",
        startup_delay=False,
        max_tasks=None,
        worker_id=get_random_string(32),
        excluded_queue_names=[],
    )


def start_worker_threads(count: int) -> list[Worker]:
    """Start `count` workers on daemon threads. Signals stay with the server: a thread's
    worker is stopped by clearing its `running` flag (stop_workers)."""
    workers = []
    for number in range(count):
        worker = new_worker()
        thread = threading.Thread(target=_run, args=(worker,), name=f"worker-{number}", daemon=True)
        thread.start()
        workers.append(worker)
    return workers


def _run(worker: Worker) -> None:
    try:
        worker.run()
    except Exception:
        log.exception("task worker stopped")


def stop_workers(workers: list[Worker]) -> None:
    for worker in workers:
        worker.running = False
