"""The `tether` command: `tether serve` runs the server (with the sweeper and task workers),
`tether worker` runs task workers alone, anything else is a Django management command
(`tether migrate`, `tether createsuperuser --noinput`, `tether shell`)."""

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
import time
from typing import Any

log = logging.getLogger("tether.serve")


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tether.settings")
    import django

    django.setup()


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tether serve", description="Run the Tether server.")
    parser.add_argument("--bind", default=os.environ.get("TETHER_BIND", "127.0.0.1:8000"))
    parser.add_argument("--no-migrate", action="store_true", help="skip migrating SQLite")
    parser.add_argument("--no-sweeper", action="store_true", help="run no background sweeper")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS with a certificate from the built-in CA (or --tls-cert/--tls-key)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain to serve instead")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes on the one port (PostgreSQL only; default 1)",
    )
    parser.add_argument(
        "--task-workers",
        type=int,
        default=None,
        help="background-task worker threads (default TETHER_WORKER_THREADS; 0: none, "
        "run `tether worker` instead)",
    )
    args = parser.parse_args(argv)
    host, _, port = args.bind.rpartition(":")
    if not host or not port.isdigit():
        parser.error("--bind takes HOST:PORT")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if not 1 <= args.workers <= 64:
        parser.error("--workers takes 1..64")
    # What the server was started with is what agents are given and which Host it answers
    # (settings: PUBLIC_URL, ALLOWED_HOSTS), in this process and the ones it starts.
    os.environ["TETHER_BIND"] = args.bind
    os.environ["TETHER_TLS"] = "1" if args.tls or args.tls_cert else "0"

    _setup_django()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections

    if args.workers > 1 and settings.IS_SQLITE:
        parser.error(
            "--workers above 1 needs PostgreSQL (TETHER_DATABASE_URL): SQLite is "
            "one process's database"
        )
    if settings.FORWARDED_ALLOW_IPS and settings.NUM_PROXIES < 1:
        parser.error(
            "TETHER_FORWARDED_ALLOW_IPS needs TETHER_NUM_PROXIES (how many proxies are in "
            "front), so that the throttles and the server agree on who the client is"
        )
    if settings.IS_SQLITE and not args.no_migrate:
        call_command("migrate", interactive=False, verbosity=0)

    tls: dict[str, str] = {}
    if args.tls or args.tls_cert:
        tls = _tls_files(host.strip("[]"), args.tls_cert, args.tls_key)
    options = {
        "host": host.strip("[]"),
        "port": int(port),
        "tls": tls,
        "sweeper": not args.no_sweeper,
        "task_workers": settings.WORKER_THREADS if args.task_workers is None else args.task_workers,
        "builtin_tls": settings.SERVES_BUILTIN_TLS,
    }
    log.info("serving on %s://%s", "https" if tls else "http", args.bind)
    if args.workers == 1:
        _serve_process(options, None, primary=True)
        return 0
    connections.close_all()
    return _supervise(options, args.workers)


def _uvicorn_config(options: dict) -> Any:
    import uvicorn
    from django.conf import settings

    from tether.httpserver import BoundedHttpToolsProtocol

    return uvicorn.Config(
        "tether.asgi:application",
        **options["tls"],
        host=options["host"],
        port=options["port"],
        # Header, body and slow-client limits (tether.httpserver); no WebSockets.
        http=BoundedHttpToolsProtocol,
        ws="none",
        # X-Forwarded-* only from the proxies the operator names (settings.FORWARDED_ALLOW_IPS).
        proxy_headers=bool(settings.FORWARDED_ALLOW_IPS),
        forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS or None,
        lifespan="off",
        log_level=os.environ.get("TETHER_LOG_LEVEL", "info").lower(),
        access_log=False,
        # Long-polls and SSE streams would otherwise hold a restart for their whole wait.
        timeout_graceful_shutdown=3,
    )


def _serve_process(options: dict, sockets: list[socket.socket] | None, primary: bool) -> None:
    """One server process: uvicorn, and in the primary process the sweeper and the task
    workers (once per server, whatever the number of processes)."""
    import uvicorn
    from django.conf import settings

    from tether.sweeper import run_sweeper
    from tether.worker import start_worker_threads, stop_workers

    settings.SERVES_BUILTIN_TLS = options["builtin_tls"]
    server = uvicorn.Server(_uvicorn_config(options))

    async def main() -> None:
        sweeper = asyncio.create_task(run_sweeper()) if primary and options["sweeper"] else None
        workers = start_worker_threads(options["task_workers"] if primary else 0)
        try:
            await server.serve(sockets=sockets)
        finally:
            stop_workers(workers)
            if sweeper:
                sweeper.cancel()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def _child(options: dict, sockets: list[socket.socket], primary: bool) -> None:
    _setup_django()
    with contextlib.suppress(KeyboardInterrupt):
        _serve_process(options, sockets, primary)


def _supervise(options: dict, count: int) -> int:
    """`--workers N`: bind once, run N server processes on the socket, start a process
    again if it dies; SIGTERM or SIGINT stops them all. Processes meet in PostgreSQL: a
    command queued through one wakes the agent held by another (tether.wakeups)."""
    import multiprocessing
    import signal
    import tempfile

    from django.conf import settings

    multiprocessing.allow_connection_pickling()
    spawn = multiprocessing.get_context("spawn")
    # One scrape of any process shows the whole server (prometheus-client multiprocess mode).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
        prefix="metrics-", dir=settings.DATA_DIR
    )
    from prometheus_client import multiprocess

    sock = _uvicorn_config(options).bind_socket()
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start(index: int) -> Any:
        process = spawn.Process(
            target=_child, args=(options, [sock], index == 0), name=f"tether-serve-{index}"
        )
        process.start()
        return process

    processes = [start(index) for index in range(count)]
    started = [time.monotonic()] * count
    quick_deaths = 0
    status = 0
    while not stopping:
        for index, process in enumerate(processes):
            process.join(timeout=0.2 / count)
            if process.is_alive() or stopping:
                continue
            # Its held polls are gone with it (this process imported the metrics before
            # the directory was set, so it tells prometheus_client where to look).
            multiprocess.mark_process_dead(process.pid, os.environ["PROMETHEUS_MULTIPROC_DIR"])
            lived = time.monotonic() - started[index]
            quick_deaths = quick_deaths + 1 if lived < 5 else 0
            if quick_deaths > 5:  # it cannot start (a bad certificate, say): stop, say so
                log.error("server processes keep dying at start; stopping (see above)")
                stopping, status = True, 1
                break
            log.warning(
                "server process %d (pid %s) died after %.0f s; starting it again",
                index,
                process.pid,
                lived,
            )
            time.sleep(min(5.0, 0.2 * 2**quick_deaths) if quick_deaths else 0)
            processes[index], started[index] = start(index), time.monotonic()
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
        process.join()
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    return status


def _tls_files(host: str, cert: str | None, key: str | None) -> dict[str, str]:
    """The operator's certificate, or one the built-in CA issues for the names agents use."""
    if cert and key:
        return {"ssl_certfile": cert, "ssl_keyfile": key}
    from urllib.parse import urlsplit

    from django.conf import settings

    from tether.pki.ca import server_certificate

    names = ["localhost", "127.0.0.1", "::1", urlsplit(settings.PUBLIC_URL).hostname or ""]
    if host not in ("0.0.0.0", "::", ""):
        names.append(host)
    cert_path, key_path = server_certificate(names)
    settings.SERVES_BUILTIN_TLS = True
    return {"ssl_certfile": str(cert_path), "ssl_keyfile": str(key_path)}


def worker(argv: list[str]) -> int:
    """`tether worker`: the task worker on its own, for larger setups (db_worker underneath)."""
    _setup_django()
    from django.conf import settings
    from django.core.management import execute_from_command_line

    from tether.deploy.ssh import remove_stale_run_dirs

    remove_stale_run_dirs()
    interval = str(settings.WORKER_INTERVAL)
    execute_from_command_line(
        ["tether", "db_worker", "--queue-name", "*", "--interval", interval, *argv]
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    if argv and argv[0] == "worker":
        return worker(argv[1:])
    _setup_django()
    from django.core.management import execute_from_command_line

    execute_from_command_line(["tether", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
