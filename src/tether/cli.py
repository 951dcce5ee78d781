"""The `tether` command: `tether serve` runs the server (with the sweeper and task workers),
`tether worker` runs task workers alone, anything else is a Django management command
(`tether migrate`, `tether createsuperuser --noinput`, `tether shell`)."""

import argparse
import asyncio
import logging
import os
import sys

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

    _setup_django()
    from django.conf import settings
    from django.core.management import call_command

    if settings.IS_SQLITE and not args.no_migrate:
        call_command("migrate", interactive=False, verbosity=0)

    import uvicorn

    from tether.asgi import application
    from tether.sweeper import run_sweeper
    from tether.worker import start_worker_threads, stop_workers

    tls: dict[str, str] = {}
    if args.tls or args.tls_cert:
        tls = _tls_files(host.strip("[]"), args.tls_cert, args.tls_key)
    config = uvicorn.Config(
        application,
        **tls,
        host=host.strip("[]"),
        port=int(port),
        lifespan="off",
        log_level=os.environ.get("TETHER_LOG_LEVEL", "info").lower(),
        access_log=False,
        # Long-polls and SSE streams would otherwise hold a restart for their whole wait.
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)

    async def main() -> None:
        sweeper = None if args.no_sweeper else asyncio.create_task(run_sweeper())
        workers = start_worker_threads(
            settings.WORKER_THREADS if args.workers is None else args.workers
        )
        try:
            await server.serve()
        finally:
            stop_workers(workers)
            if sweeper:
                sweeper.cancel()

    log.info("serving on %s://%s", "https" if tls else "http", args.bind)
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    return 0


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
