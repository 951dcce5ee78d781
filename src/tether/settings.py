"""Tether settings: every knob comes from a `TETHER_*` environment variable with a default
that works on a laptop (SQLite in WAL mode under `TETHER_DATA_DIR`)."""

import contextlib
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.management.utils import get_random_secret_key


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_rate(name: str, default: str) -> str:
    """A throttle rate, "N/s", "N/min", "N/hour" or "N/day" (as DRF reads it), checked at start:
    a typo would otherwise be a 500 on the first request it throttles."""
    value = os.environ.get(name, default).strip()
    number, _, period = value.partition("/")
    if not (number.isascii() and number.isdigit() and period[:1] in ("s", "m", "h", "d")):
        raise ValueError(f"{name}={value!r}: expected N/s, N/min, N/hour or N/day")
    return value


BASE_DIR = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("TETHER_DATA_DIR", "var")).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)
# The agent lives in the repository beside src/ and is served to agents for upgrades.
AGENT_DIR = Path(os.environ.get("TETHER_AGENT_DIR", BASE_DIR.parent.parent / "agent")).resolve()


def _secret_key() -> str:
    """Use TETHER_SECRET_KEY, or a key generated once and kept in the data dir, so that a
    laptop install survives restarts without leaking a default key into production."""
    key = os.environ.get("TETHER_SECRET_KEY")
    if key:
        return key
    path = DATA_DIR / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(get_random_secret_key())
    return path.read_text().strip()


SECRET_KEY = _secret_key()
# Former keys, comma-separated: what they encrypted (agent secrets, SSH keys) and signed
# (sessions) is still read while `tether reencrypt` moves it to SECRET_KEY (docs/security.md).
SECRET_KEY_FALLBACKS = [
    key.strip()
    for key in os.environ.get("TETHER_SECRET_KEY_FALLBACKS", "").split(",")
    if key.strip()
]
DEBUG = env_bool("TETHER_DEBUG", False)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# Where `tether serve` listens: it sets TETHER_BIND from its --bind and TETHER_TLS from --tls.
_BIND_HOST, _, _BIND_PORT = os.environ.get("TETHER_BIND", "127.0.0.1:8000").rpartition(":")
_BIND_HOST = _BIND_HOST.strip("[]")
_BOUND_TO_ALL = _BIND_HOST in ("", "0.0.0.0", "::")
_FQDN = socket.getfqdn()
# The URL agents are given (install lines, deployments, upgrades): TETHER_PUBLIC_URL, else
# the one `tether serve` was started with (named by the machine's FQDN when bound to every
# address). Never a request's Host header, which whoever sends the request chooses.
PUBLIC_URL = (
    os.environ.get("TETHER_PUBLIC_URL")
    or "{}://{}:{}".format(
        "https" if env_bool("TETHER_TLS", False) else "http",
        _bracketed(_FQDN if _BOUND_TO_ALL else _BIND_HOST),
        _BIND_PORT,
    )
).rstrip("/")


def _default_allowed_hosts() -> list[str]:
    """The names the server was started with: loopback, its bind address, its public URL's
    host and the machine's names (and, bound to every address, what its hostname resolves
    to). Anything else is TETHER_ALLOWED_HOSTS."""
    hosts = ["localhost", "127.0.0.1", "[::1]", _FQDN, socket.gethostname()]
    hosts.append(_bracketed(urlsplit(PUBLIC_URL).hostname or "localhost"))
    if _BOUND_TO_ALL:
        with contextlib.suppress(OSError):
            hosts += socket.gethostbyname_ex(socket.gethostname())[2]
    else:
        hosts.append(_bracketed(_BIND_HOST))
    return list(dict.fromkeys(hosts))


ALLOWED_HOSTS = [
    host.strip() for host in os.environ.get("TETHER_ALLOWED_HOSTS", "").split(",") if host.strip()
] or _default_allowed_hosts()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "django_tasks",
    "django_tasks_db",
    "tether.accounts",
    "tether.fleet",
    # In layer order (docs/architecture.md): hooks are connected, and so called, in this order.
    "tether.commands",
    "tether.pki",
    "tether.deploy",
    "tether.web",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "tether.accounts.origin.audit_origin",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "tether.urls"
ASGI_APPLICATION = "tether.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

_database_url = os.environ.get("TETHER_DATABASE_URL")
if _database_url:
    DATABASES = {
        "default": dj_database_url.parse(_database_url, conn_max_age=60, conn_health_checks=True)
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "tether.sqlite3",
            # Keep the connection: reopening it (and re-running the PRAGMAs) on every request
            # costs more than the request itself on the agent hot path.
            "CONN_MAX_AGE": None,
            "OPTIONS": {
                # IMMEDIATE takes the write lock up front, so two writers queue on `timeout`
                # instead of failing with "database is locked" when a read upgrades to a write.
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": (
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=20000;"
                ),
            },
        }
    }
IS_SQLITE = DATABASES["default"]["ENGINE"].endswith("sqlite3")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
LOGIN_URL = "/login/"

# Throttles count in the cache: in memory for the one process SQLite serves; in PostgreSQL
# when several processes (or hosts) serve one fleet, so that they count together. The table
# is made by a migration (accounts 0002).
CACHES = {
    "default": (
        {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
        if IS_SQLITE
        else {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "tether_cache"}
    ),
    # What one process counts alone: polls per agent (tether.fleet.guard). Room for a fleet.
    "process": {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        "LOCATION": "tether-process",
        "OPTIONS": {"MAX_ENTRIES": 200_000},
    },
}

# Request bodies: agents stream output in chunks well below this; the original dialect's
# final result carries the whole output, so result calls may be as large as the output cap.
MAX_REQUEST_BYTES = env_int("TETHER_MAX_REQUEST_BYTES", 1024 * 1024)
MAX_OUTPUT_BYTES = env_int("TETHER_MAX_OUTPUT_BYTES", 16 * 1024 * 1024)
MAX_RESULT_BYTES = 2 * MAX_OUTPUT_BYTES + 64 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = max(MAX_REQUEST_BYTES, MAX_RESULT_BYTES)
MAX_DEPLOYMENT_LOG_BYTES = env_int("TETHER_MAX_DEPLOYMENT_LOG_BYTES", 1024 * 1024)

# Background jobs (SSH deployments) go through Django's Tasks API on the database backend;
# `tether serve` runs WORKER_THREADS workers in-process (0: run `tether worker` instead).
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
WORKER_THREADS = env_int("TETHER_WORKER_THREADS", 2)
WORKER_INTERVAL = env_float("TETHER_WORKER_INTERVAL", 1.0)  # `tether worker` polling
# Agent lifecycle: how long an upgraded or started agent has to come back online, and how
# long an SSH run may take before it is stopped.
DEPLOY_ONLINE_DEADLINE = env_float("TETHER_DEPLOY_ONLINE_DEADLINE", 120)
DEPLOY_SSH_TIMEOUT = env_float("TETHER_DEPLOY_SSH_TIMEOUT", 600)

# Built-in CA (docs/agent-rpc.md): made under DATA_DIR/ca unless an operator gives their own.
CA_CERT_PATH = os.environ.get("TETHER_CA_CERT", "")
CA_KEY_PATH = os.environ.get("TETHER_CA_KEY", "")
AGENT_CERT_DAYS = env_int("TETHER_AGENT_CERT_DAYS", 365)
CERT_RENEW_DAYS = env_int("TETHER_CERT_RENEW_DAYS", 30)
RPC_TIMEOUT = env_float("TETHER_RPC_TIMEOUT", 3)
# Set by `tether serve --tls` when the built-in CA vouches for this server: only then are
# agents handed the CA to pin (a proxy's or an operator's certificate would lock them out).
SERVES_BUILTIN_TLS = False

# Fleet timers (seconds). Tests and benchmarks turn these down instead of sleeping.
HEARTBEAT_INTERVAL = env_float("TETHER_HEARTBEAT_INTERVAL", 30)
POLL_INTERVAL = env_float("TETHER_POLL_INTERVAL", 5)
LONG_POLL_TIMEOUT = env_float("TETHER_LONG_POLL_TIMEOUT", 25)
# A delivered command not acknowledged within its lease is delivered again.
COMMAND_LEASE = env_float("TETHER_COMMAND_LEASE", 30)
# A command still queued this long after it entered the queue ends `expired` (0: never).
COMMAND_EXPIRE = env_float("TETHER_COMMAND_EXPIRE", 24 * 3600)
# Running commands of an agent offline this long past its offline mark become `lost`.
LOST_GRACE = env_float("TETHER_LOST_GRACE", 300)
# How often the sweeper marks offline agents and lost commands.
SWEEP_INTERVAL = env_float("TETHER_SWEEP_INTERVAL", min(HEARTBEAT_INTERVAL, 10))
COMMAND_TIMEOUT_DEFAULT = env_int("TETHER_COMMAND_TIMEOUT_DEFAULT", 300)
COMMAND_TIMEOUT_MAX = env_int("TETHER_COMMAND_TIMEOUT_MAX", 7 * 24 * 3600)
# Threads (and so database connections) that serve agent endpoints and live streams. SQLite
# takes one writer at a time and makes a waiting connection sleep, so one thread is fastest.
DB_THREADS = env_int("TETHER_DB_THREADS", 1 if IS_SQLITE else 8)
# Threads for the human side (API, pages, streams' sync steps), each with its connection.
HTTP_THREADS = env_int("TETHER_HTTP_THREADS", 4)
# How often one query looks for work no notification announced (a lease that ran out, a
# cancel to send again, a writer that could not notify), for all held long-polls at once.
POLL_RECHECK = env_float("TETHER_POLL_RECHECK", 2)
# A signed request is accepted up to SIGNATURE_WINDOW seconds after its timestamp and
# SIGNATURE_FUTURE before it (clock skew; an agent whose clock is further off is refused and
# signs with the server's time from then on); its nonce is remembered for the window.
SIGNATURE_WINDOW = env_int("TETHER_SIGNATURE_WINDOW", 300)
SIGNATURE_FUTURE = env_int("TETHER_SIGNATURE_FUTURE", 30)
ACCEPT_LEGACY_AGENTS = env_bool("TETHER_ACCEPT_LEGACY_AGENTS", True)
# Throttles ("N/s", "N/min", "N/hour", "N/day"; docs/security.md). Past a rate the caller
# gets 429 with Retry-After. Registration counts every call per address; logins (API and
# page) count failed attempts, per username and per address; agent requests refused with 401
# count per address, which is then refused before its tokens are looked at; polls that found
# nothing count per agent, in each process's memory (a poll must cost no query).
REGISTER_RATE = env_rate("TETHER_REGISTER_RATE", "60/min")
LOGIN_RATE = env_rate("TETHER_LOGIN_RATE", "10/min")
LOGIN_ADDRESS_RATE = env_rate("TETHER_LOGIN_ADDRESS_RATE", "30/min")
AGENT_AUTH_FAIL_RATE = env_rate("TETHER_AGENT_AUTH_FAIL_RATE", "60/min")
POLL_RATE = env_rate("TETHER_POLL_RATE", "120/min")

# Human API tokens live this many days unless their creator says otherwise (0: never).
TOKEN_DAYS = env_int("TETHER_TOKEN_DAYS", 90)

# Behind proxies: throttles take the peer address from X-Forwarded-For, counting
# TETHER_NUM_PROXIES proxies from the right. The ASGI server itself believes X-Forwarded-For
# and X-Forwarded-Proto (the address Django sees as REMOTE_ADDR, the scheme) only from the
# proxies in TETHER_FORWARDED_ALLOW_IPS (addresses or networks), and only when
# TETHER_NUM_PROXIES is set too; by default from nobody.
NUM_PROXIES = env_int("TETHER_NUM_PROXIES", 0)
FORWARDED_ALLOW_IPS = [
    ip.strip() for ip in os.environ.get("TETHER_FORWARDED_ALLOW_IPS", "").split(",") if ip.strip()
]

# HTTP limits, enforced before Django sees a request (tether.httpserver, docs/security.md):
# request head (request line and headers) in bytes, header fields, request target; seconds
# for a head to arrive, and for a body (plus one second per HTTP_BODY_MIN_RATE bytes).
HTTP_MAX_HEAD_BYTES = env_int("TETHER_HTTP_MAX_HEAD_BYTES", 32 * 1024)
HTTP_MAX_HEADERS = env_int("TETHER_HTTP_MAX_HEADERS", 100)
HTTP_MAX_REQUEST_LINE = env_int("TETHER_HTTP_MAX_REQUEST_LINE", 8 * 1024)
HTTP_HEAD_TIMEOUT = env_float("TETHER_HTTP_HEAD_TIMEOUT", 10)
HTTP_BODY_TIMEOUT = env_float("TETHER_HTTP_BODY_TIMEOUT", 30)
HTTP_BODY_MIN_RATE = env_int("TETHER_HTTP_BODY_MIN_RATE", 1024)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tether.accounts.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["tether.parsers.BoundedJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 100,
    "EXCEPTION_HANDLER": "tether.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "tether.schema.TetherAutoSchema",
    "DEFAULT_THROTTLE_RATES": {"register": REGISTER_RATE},
    # Throttles key on the peer address; X-Forwarded-For counts only behind this many proxies.
    "NUM_PROXIES": NUM_PROXIES,
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tether API",
    "DESCRIPTION": "Control plane for fleets of Linux servers.",
    "VERSION": "0.1.0",
    # Its module describes the views DRF does not serve (the poll, the streams, agent files).
    "DEFAULT_GENERATOR_CLASS": "tether.schema_views.SchemaGenerator",
    # Request bodies apart from answers: what a client may send (write-only fields, unknown
    # fields refused) is not what it reads back.
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_INCLUDE_SCHEMA": False,
    "ENUM_NAME_OVERRIDES": {
        "CommandStatusEnum": "tether.commands.models.Command.Status",
        "CommandKindEnum": "tether.commands.models.Command.Kind",
        "AgentStatusEnum": "tether.fleet.models.Agent.Status",
        "DeploymentStatusEnum": "tether.deploy.models.Deployment.Status",
        "DeploymentKindEnum": "tether.deploy.models.Deployment.Kind",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"line": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line"}},
    "root": {"handlers": ["stderr"], "level": os.environ.get("TETHER_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.request": {"level": "ERROR"},
        # The in-process workers look at the queue every few seconds: not news.
        "django_tasks_db": {"level": "WARNING"},
    },
}

# ---------------------------------------------------------------------------------------
# GET /metrics (docs/metrics.md). A scrape is allowed from a peer address (the connection's
# own, never X-Forwarded-For) in TETHER_METRICS_ALLOW, comma-separated networks, or with
# `Authorization: Bearer TETHER_METRICS_TOKEN` (empty: no access by token). A malformed
# network stops the server at start rather than opening or closing the door by surprise.
import ipaddress  # noqa: E402

METRICS_ALLOW = tuple(
    ipaddress.ip_network(network.strip(), strict=False)
    for network in os.environ.get("TETHER_METRICS_ALLOW", "127.0.0.1/32,::1/128").split(",")
    if network.strip()
)
METRICS_TOKEN = os.environ.get("TETHER_METRICS_TOKEN", "")
# Requests by route and code, for the human API and the pages: first, so that what the other
# middleware answers (redirects, refusals) counts too. Agent endpoints skip the middleware.
MIDDLEWARE = ["tether.monitoring.request_metrics", *MIDDLEWARE]
