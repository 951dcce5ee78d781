"""The background-task worker: threads inside `tether serve` by default, or its own process
(`tether worker`) when deployments should not share the web server's CPU.

In-process workers do not poll the queue in a tight loop (on SQLite every look takes the write
lock that the agent path needs): a task enqueued by this process wakes them at once, and they
look every IDLE_CHECK seconds for tasks that another process enqueued."""

import logging
import threading

from django.utils.crypto import get_random_string
from django_tasks.signals import task_enqueued
from django_tasks_db.management.commands.db_worker import Worker

log = logging.getLogger("tether.worker")

IDLE_CHECK = 5.0


class WorkerThread(threading.Thread):
    def __init__(self, number: int) -> None:
        super().__init__(name=f"task-worker-{number}", daemon=True)
        self.wake = threading.Event()
        self.running = True

    def run(self) -> None:
        while self.running:
            # Batch mode: run what is ready, then return here to wait.
            worker = Worker(
                queue_names=["*"],
                interval=0,
                batch=True,
                backend_name="default",
                startup_delay=False,
                max_tasks=None,
                worker_id=get_random_string(32),
                excluded_queue_names=[],
            )
            try:
                worker.run()
            except Exception:
                log.exception("task worker failed; retrying")
            self.wake.wait(IDLE_CHECK)
            self.wake.clear()


_threads: list[WorkerThread] = []


def _wake_all(**_: object) -> None:
    for thread in _threads:
        thread.wake.set()


def start_worker_threads(count: int) -> list[WorkerThread]:
    """Start `count` workers on daemon threads; signals stay with the server."""
    if count:
        from tether.deploy.ssh import remove_stale_run_dirs

        remove_stale_run_dirs()
    threads = [WorkerThread(number) for number in range(count)]
    _threads.extend(threads)
    if threads:
        task_enqueued.connect(_wake_all, dispatch_uid="tether.worker.wake")
    for thread in threads:
        thread.start()
    return threads


def stop_workers(threads: list[WorkerThread]) -> None:
    """No new task starts. One already running is cut off when the process exits (the threads
    are daemons, so a shutdown is not held up by a long playbook); its deployment then fails
    at its deadline."""
    for thread in threads:
        thread.running = False
        thread.wake.set()
