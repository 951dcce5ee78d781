#!/usr/bin/env python3
"""Tether agent: pulls commands from a Tether server, runs them, streams their output back.

One file on the Python >= 3.8 standard library, so that it installs on any host and upgrades by
replacing this file. The sections follow the agent's life: config, state on disk, HTTP client,
registration, poll loop, running a command, output spooling and sending, lifecycle (upgrade,
stop), certificates and the RPC endpoint, main.
The wire protocol is docs/agent-protocol.md (and docs/agent-rpc.md) in the Tether repository.
"""

__version__ = "0.1.0"

import argparse
import base64
import contextlib
import hashlib
import hmac
import http.client
import http.server
import json
import os
import platform
import queue
import random
import re
import selectors
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urlsplit

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

DEFAULT_STATE_DIR = "/var/lib/tether-agent"
# The RPC endpoint's port unless told otherwise: unprivileged (no root needed), below the
# kernel's ephemeral range (32768-60999), so no outgoing connection ever holds it.
DEFAULT_RPC_PORT = 7443
STREAMS = ("stdout", "stderr")

BACKOFF_START = 0.2  # seconds; exponential with full jitter
BACKOFF_CAP = 5.0
REGISTER_BACKOFF_CAP = 60.0  # a refused registration needs a human; don't hammer the server
HTTP_TIMEOUT = 15.0

READ_SIZE = 65536
STREAM_INTERVAL = 0.25  # new output reaches the server at least this often
STREAM_EAGER_BYTES = 64 * 1024  # ...or at once when this much is pending
MAX_CHUNK_BYTES = 256 * 1024  # raw bytes per stream per call
MAX_BODY_BYTES = 1000 * 1000  # stays under the server's 1 MiB request limit
# The spool's tail is kept in files of a quarter of the tail window, but not smaller than this:
# dropping the oldest file is how the tail rolls (SpoolWriter).
MIN_SEGMENT_BYTES = 16 * 1024
# A command that ends within this window is reported with a single result call instead of an
# acknowledging progress call followed by the result: the lease is far longer than this.
ACK_DELAY = 0.05
# Ids of accepted, not yet started commands listed on a poll at most (the server takes 200):
# while the agent polls, the server does not hand them out again (docs/agent-protocol.md).
HOLDING_MAX = 100
ORPHAN_PIPE_GRACE = 2.0  # background children holding the pipes after the command exited
SHUTDOWN_FLUSH = 5.0
OFFSET_SAVE_INTERVAL = 2.0
JOURNAL_KEEP_SECONDS = 86400  # the server never hands out a command again once it has its result
PRUNE_INTERVAL = 3600

# Used until the server sends its own; the first poll of a restarted agent uses wait=0.
DEFAULT_REMOTE_CONFIG = {
    "heartbeat_interval": 30,
    "poll_interval": 5,
    "long_poll_timeout": 25,
    "max_output_bytes": 10 * 1024 * 1024,
    "lease_seconds": 60,
}

SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

_log_lock = threading.Lock()


def log(level, message, **fields):
    """One line per event on stderr (`time level message key=value`): grep and journald read it."""
    parts = [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), level, message]
    for key, value in fields.items():
        text = str(value)
        if text == "" or any(c in text for c in ' ="\n\t'):
            text = json.dumps(text)
        parts.append("%s=%s" % (key, text))
    line = " ".join(parts) + "\n"
    with _log_lock:
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def parse_args(argv=None):
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="tether-agent", description="Tether agent")
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--self-test", action="store_true", help="check this file can run here, then exit"
    )
    parser.add_argument(
        "--config",
        default=env("TETHER_AGENT_CONFIG"),
        help="JSON file with server, server_token, state_dir, ca_file (flags win)",
    )
    parser.add_argument("--server", default=env("TETHER_SERVER"), help="server URL")
    parser.add_argument(
        "--server-token", default=env("TETHER_SERVER_TOKEN"), help="registration token"
    )
    parser.add_argument("--state-dir", default=env("TETHER_STATE_DIR"))
    parser.add_argument("--max-concurrent", type=int, default=4)
    parser.add_argument("--kill-grace", type=float, default=5.0, help="seconds from TERM to KILL")
    parser.add_argument(
        "--rpc-port",
        type=int,
        default=None,
        help="serve RPC on this port, or fail if it is taken (0: no RPC endpoint); default: "
        "the port the server knows, else %d, else one the OS picks" % DEFAULT_RPC_PORT,
    )
    parser.add_argument("--no-rpc", action="store_true", help="serve no RPC endpoint")
    parser.add_argument("--ca-file", default=env("TETHER_CA_FILE"), help="CA bundle for HTTPS")
    args = parser.parse_args(argv)
    if args.max_concurrent < 1:
        parser.error("--max-concurrent must be at least 1")
    if args.rpc_port is not None and not 0 <= args.rpc_port <= 65535:
        parser.error("--rpc-port must be 0..65535")
    if args.no_rpc and args.rpc_port:
        parser.error("--no-rpc and --rpc-port %d contradict each other" % args.rpc_port)
    if args.no_rpc:
        args.rpc_port = 0  # None: the agent chooses; 0: no endpoint; N: the operator's port
    if args.config:
        # Written by the SSH installer; keeps the server token out of `ps` and unit files.
        config = read_json(args.config)
        if config is None:
            parser.error("--config %s: not a readable JSON object" % args.config)
        for key in ("server", "server_token", "state_dir", "ca_file"):
            if getattr(args, key) is None and isinstance(config.get(key), str):
                setattr(args, key, config[key])
    args.state_dir = args.state_dir or DEFAULT_STATE_DIR
    return args


class Backoff:
    """Exponential backoff with full jitter, so that a fleet coming back does not retry in step."""

    def __init__(self, start=BACKOFF_START, cap=BACKOFF_CAP):
        self.start = start
        self.cap = cap
        self.failures = 0

    def next_delay(self):
        delay = random.uniform(0, min(self.cap, self.start * (2**self.failures)))
        self.failures = min(self.failures + 1, 30)
        return delay

    def reset(self):
        self.failures = 0


# ---------------------------------------------------------------------------------------------
# State on disk
#   credentials.json      who this agent is, and the RPC port its server knows (0600)
#   ca.pem                the server's CA, kept at registration: the pin for an https:// server
#   tls.json              {"verify_ssl": false} while the server says not to verify it
#   rpc.crt, rpc.key      the RPC endpoint's certificate and key (0600), from the server's CA
#   commands/<id>.json    the journal: one entry per command ever accepted, so none runs twice
#   out/<id>.stdout|err   the output spool: what the command wrote, kept until reported;
#   out/<id>.stdout.<N>   past the head, in segments named by the offset of their first byte
# ---------------------------------------------------------------------------------------------


def write_file_atomic(path, payload, durable=False, mode=0o600):
    """Readers see the old file or the new one, never half of one. `durable` adds the fsyncs
    that make the write survive a power cut; an agent crash alone never loses page cache."""
    tmp = "%s.tmp-%d" % (path, threading.get_ident())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_json(path):
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_credentials(state_dir):
    creds = read_json(os.path.join(state_dir, "credentials.json"))
    if creds and creds.get("token") and creds.get("secret_key"):
        return creds
    return None


def machine_identity(state_dir, machine_id_file="/etc/machine-id"):
    """(machine_id, instance_id) sent at registration. The machine id is derived from
    /etc/machine-id (never sent as is: machine-id(5) asks that it stay private) and the state
    dir, so two agents on one host are two identities and a cloned host is the same one; the
    instance id is this state dir's own, so the server tells a restart from a clone."""
    instance = _state_id(state_dir, "instance-id")
    try:
        with open(machine_id_file, "rb") as f:
            machine = f.read().strip().decode("ascii")
    except (OSError, UnicodeDecodeError):
        machine = ""
    if not re.fullmatch(r"[0-9a-f]{32}", machine):
        machine = _state_id(state_dir, "machine-id")
    where = os.path.realpath(state_dir) if state_dir else ""
    digest = hashlib.sha256(("tether-agent\0%s\0%s" % (machine, where)).encode("utf-8"))
    return digest.hexdigest()[:32], instance


def _state_id(state_dir, name):
    """A random id kept in the state dir (made on first use)."""
    path = os.path.join(state_dir, name) if state_dir else None
    if path:
        try:
            with open(path, "rb") as f:
                value = f.read().strip().decode("ascii")
            if re.fullmatch(r"[0-9a-f]{32}", value):
                return value
        except (OSError, UnicodeDecodeError):
            pass
    value = os.urandom(16).hex()
    if path:
        try:
            write_file_atomic(path, value.encode("ascii") + b"\n", durable=True)
        except OSError as exc:
            log("warn", "cannot keep an id in the state dir", name=name, error=exc)
    return value


def save_credentials(state_dir, creds):
    payload = json.dumps(creds, indent=2, sort_keys=True).encode("utf-8")
    write_file_atomic(os.path.join(state_dir, "credentials.json"), payload, durable=True)


class Run:
    """A command this agent accepted: its journal entry plus what lives only in memory.

    `entry["state"]` goes accepted -> started -> done -> reported; `lock` guards every change of
    the entry so that the poll loop, a worker and the sender never race on a transition."""

    def __init__(self, entry):
        self.id = entry["id"]
        self.entry = entry
        self.lock = threading.Lock()
        result = entry.get("result") or {}
        offsets = entry.get("offsets") or {}
        # Bytes the command wrote to each stream (its offsets), spooled or not.
        self.stored = {s: int(result.get(s + "_size") or 0) for s in STREAMS}
        self.acked = {s: int(offsets.get(s) or 0) for s in STREAMS}
        # The spool of each stream: [first offset, size] of each file, in offset order (the
        # gaps between them, and after the last, are bytes the agent dropped). spool_lock
        # guards the lists and the files' deletion against the sender reading them.
        self.segments = {s: [] for s in STREAMS}
        self.spool_lock = threading.Lock()
        self.dropped = 0  # bytes deleted from the spool unacknowledged (logged at the end)
        self.acknowledged = False  # the server has answered a progress or result call
        self.cancel_requested = False
        self.started_mono = None
        self.last_sent_mono = 0.0
        self.offsets_saved_mono = 0.0
        self.retry_at = 0.0
        self.backoff = Backoff()
        self.chunk_limit = MAX_CHUNK_BYTES
        self.progress_refused = False
        self.resend_result = False  # a reported command was delivered again
        self.payload = None  # an internal command's payload: in memory only
        self.conflicts = 0

    @property
    def state(self):
        return self.entry["state"]

    def pending(self, stream):
        return max(0, self.stored[stream] - self.acked[stream])


class Journal:
    """The commands/ and out/ folders, and the index of ids seen, which is what makes a command
    run at most once: its entry is on disk before its process starts and outlives restarts."""

    def __init__(self, state_dir):
        self.commands_dir = os.path.join(state_dir, "commands")
        self.out_dir = os.path.join(state_dir, "out")
        for path in (self.commands_dir, self.out_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)
        self.lock = threading.Lock()
        self.active = {}  # id -> Run, not yet reported
        self.reported = set()  # ids reported, kept for dedupe

    def entry_path(self, cid):
        return os.path.join(self.commands_dir, cid + ".json")

    def spool_path(self, cid, stream):
        return os.path.join(self.out_dir, "%s.%s" % (cid, stream))

    def save(self, entry, durable=False):
        entry["updated_at"] = time.time()
        payload = json.dumps(entry, separators=(",", ":"), sort_keys=True).encode("utf-8")
        write_file_atomic(self.entry_path(entry["id"]), payload, durable=durable)

    def load(self, cid):
        return read_json(self.entry_path(cid))

    def ids(self):
        names = [n for n in os.listdir(self.commands_dir) if n.endswith(".json")]
        return [n[: -len(".json")] for n in names if SAFE_ID.match(n[: -len(".json")])]

    def remove_stale_tmp(self):
        """Half-written entries of a crashed agent (called before anything else writes)."""
        for name in os.listdir(self.commands_dir):
            if ".tmp-" in name:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.commands_dir, name))

    def get(self, cid):
        with self.lock:
            return self.active.get(cid)

    def knows(self, cid):
        with self.lock:
            return cid in self.active or cid in self.reported

    def add(self, run):
        with self.lock:
            self.active[run.id] = run

    def mark_reported(self, run):
        with self.lock:
            self.active.pop(run.id, None)
            self.reported.add(run.id)

    def segment_path(self, cid, stream, start):
        path = self.spool_path(cid, stream)
        return path if start == 0 else "%s.%d" % (path, start)

    def spool_files(self, cid):
        prefix = cid + "."
        try:
            return [n for n in os.listdir(self.out_dir) if n.startswith(prefix)]
        except OSError:
            return []

    def delete_spool(self, cid):
        for name in self.spool_files(cid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.out_dir, name))

    def load_segments(self, cid, stream):
        """The spool files of a stream found on disk, as Run.segments holds them."""
        segments = []
        prefix = "%s.%s" % (cid, stream)
        for name in self.spool_files(cid):
            start = name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None
            if name != prefix and not (start and start.isascii() and start.isdigit()):
                continue
            try:
                size = os.path.getsize(os.path.join(self.out_dir, name))
            except OSError:
                continue
            segments.append([int(start or 0), size])
        segments.sort()
        return segments

    def read_spool(self, run, stream, offset, size):
        """Up to `size` spooled bytes of `stream` from `offset`, across files that follow each
        other, as (where they start, how many bytes right before that start the spool dropped,
        the bytes, whether they stop where bytes were dropped). Where `offset` falls in a gap
        the bytes start after it; past the last file they are empty, at the stream's end."""
        with run.spool_lock:
            segments = run.segments[stream]
            while True:
                index, before = 0, 0  # the first file that holds `offset` or follows it
                while index < len(segments):
                    start, length = segments[index]
                    if length and offset < start + length:
                        break
                    before = start + length if length else before
                    index += 1
                else:  # past the last file: what is left of the stream was dropped
                    end = max(run.stored[stream], offset)
                    return end, (end - before if end > offset else 0), b"", False
                at = max(offset, segments[index][0])
                data, short = self._read_files(run, stream, index, at, size)
                if short and not data:
                    continue  # a file lost bytes: look again
                end = at + len(data)
                cut = end < run.stored[stream] and not any(
                    start <= end < start + length for start, length in segments
                )
                return at, (segments[index][0] - before if at > offset else 0), data, cut

    def _read_files(self, run, stream, index, at, size):
        """The bytes from `at` in the file at `index` and in those that continue it."""
        segments = run.segments[stream]
        parts = []
        while size > 0 and index < len(segments):
            start, length = segments[index]
            if not start <= at < start + length:
                break  # a gap, or nothing past the last file
            want = min(size, start + length - at)
            try:
                with open(self.segment_path(run.id, stream, start), "rb") as f:
                    f.seek(at - start)
                    data = f.read(want)
            except OSError:
                data = b""
            parts.append(data)
            if len(data) < want:
                # The file lost bytes (a power cut, a hand): the rest of it is a gap.
                log("warn", "spool shorter than expected", id=run.id, stream=stream)
                segments[index][1] = at - start + len(data)
                if not segments[index][1]:
                    del segments[index]
                return b"".join(parts), True
            at += want
            size -= want
            index += 1
        return b"".join(parts), False

    def prune(self):
        """Forget reported commands after a day (by file age), and spool files nobody owns."""
        cutoff = time.time() - JOURNAL_KEEP_SECONDS
        with self.lock:
            reported = list(self.reported)
            active = set(self.active)
        for cid in reported:
            path = self.entry_path(cid)
            try:
                if os.path.getmtime(path) < cutoff:
                    os.unlink(path)
                    with self.lock:
                        self.reported.discard(cid)
            except OSError:
                pass
        for name in os.listdir(self.out_dir):
            if name.split(".", 1)[0] not in active:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.out_dir, name))


# ---------------------------------------------------------------------------------------------
# HTTP client
# ---------------------------------------------------------------------------------------------


class TransientError(Exception):
    """The server could not be reached or failed (5xx): the same message is worth retrying."""


class Shutdown(Exception):
    """Raised by the signal handler to abort a blocking call in the main thread."""


class Response:
    def __init__(self, status, data, headers, raw=b""):
        self.status = status
        self.data = data if isinstance(data, dict) else {}
        self.headers = headers
        self.raw = raw

    def error_code(self):
        error = self.data.get("error")
        return error.get("code") if isinstance(error, dict) else None

    def error_message(self):
        error = self.data.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error.get("code") or "")
        return str(error or "")


def json_bytes(body):
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class TlsError(TransientError):
    """The server's certificate does not verify: nothing was sent to it (the handshake comes
    before the request), and only an operator (or the server's config) can fix it."""


NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
CLOCK_TOLERANCE = 5  # seconds off the server's clock before signing with its time


def request_signature(secret_key, method, path, timestamp, body, nonce=""):
    """HMAC-SHA256 over method, path (with its query), timestamp, nonce and the body's hash:
    what the agent's calls carry (with a fresh nonce each, so a replay is refused) and what
    the server's RPC calls to the agent must carry (without)."""
    parts = [method, path, timestamp, hashlib.sha256(body).hexdigest()]
    if nonce:
        parts.insert(3, nonce)
    message = "\n".join(parts)
    key = secret_key.encode("ascii")
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


class Client:
    """JSON over urllib, signed as the protocol asks. A new connection per request keeps it
    simple; on the loopback or LAN that costs well under a millisecond.

    An https:// server is verified with --ca-file when given, else with the CA pinned at
    registration (`ca.pem`), else (first registration) with the system's trust store; the
    server's `verify_ssl: false` turns verification off. The HTTPS context is rebuilt when one
    of these changes (`reload_tls`)."""

    def __init__(self, server_url, ca_file=None, state_dir=None):
        self.server_url = server_url.rstrip("/")
        self.path_prefix = urlsplit(self.server_url).path
        self.ca_file = ca_file
        self.state_dir = state_dir
        tls = read_json(self.state_path("tls.json")) if state_dir else None
        self.verify_ssl = (tls or {}).get("verify_ssl") is not False
        self.opener = None  # built on first use, and again after reload_tls()
        self.credentials = None
        self.clock_offset = 0.0
        self.user_agent = "tether-agent/%s" % __version__

    def state_path(self, name):
        return os.path.join(self.state_dir, name) if self.state_dir else None

    def https_context(self):
        """The context for the next connections; raises OSError/ssl.SSLError when the CA file
        cannot be read (a broken pin is an error, never a reason to trust more)."""
        if not self.verify_ssl:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        if self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        pinned = self.state_path(PINNED_CA)
        if pinned and os.path.exists(pinned):
            return ssl.create_default_context(cafile=pinned)
        return ssl.create_default_context()

    def reload_tls(self):
        self.opener = None

    def pin_ca(self, pem):
        """Keep the CA the server sent at registration; from now on it alone vouches for an
        https:// server (unless --ca-file names another)."""
        if not self.state_dir or not isinstance(pem, str) or not pem:
            return
        try:
            ssl.create_default_context(cadata=pem)
        except (ssl.SSLError, ValueError) as exc:  # a pin that loads nothing would lock us out
            log("warn", "the server's CA certificate does not load; not pinning it", error=exc)
            return
        payload = pem.encode("utf-8")
        write_file_atomic(self.state_path(PINNED_CA), payload, durable=True, mode=0o644)
        self.reload_tls()

    def set_verify_ssl(self, verify):
        """The server's `config.verify_ssl`, kept on disk: a restarted agent must reach a
        server whose certificate it was told not to verify before it can hear that again."""
        verify = verify is not False
        if verify == self.verify_ssl:
            return
        self.verify_ssl = verify
        if self.state_dir:
            payload = json_bytes({"verify_ssl": verify})
            write_file_atomic(self.state_path("tls.json"), payload, durable=True)
        if verify:
            log("info", "verifying the server's certificate again, as the server asks")
        else:
            log("warn", "not verifying the server's certificate, as the server asks")
        self.reload_tls()

    def sign(self, method, path, body):
        creds = self.credentials
        timestamp = str(int(time.time() + self.clock_offset))
        nonce = os.urandom(16).hex()
        signature = request_signature(creds["secret_key"], method, path, timestamp, body, nonce)
        return {
            "X-Agent-Token": creds["token"],
            "X-Tether-Timestamp": timestamp,
            "X-Tether-Nonce": nonce,
            "X-Tether-Signature": signature,
        }

    def request(self, method, path, body=None, data=None, timeout=HTTP_TIMEOUT, signed=True):
        """One attempt. Returns a Response for 2xx-4xx; raises TransientError otherwise.
        `path` includes the query string; `data` is an already encoded JSON body."""
        if data is None and body is not None:
            data = json_bytes(body)
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if signed and self.credentials:
            headers.update(self.sign(method, self.path_prefix + path, data or b""))
        req = urllib.request.Request(
            self.server_url + path, data=data, headers=headers, method=method
        )
        try:
            opener = self.opener
            if opener is None:
                # Plain http:// needs no context (building one loads the system's CA store).
                handlers = []
                if self.server_url.startswith("https:"):
                    handlers.append(urllib.request.HTTPSHandler(context=self.https_context()))
                opener = self.opener = urllib.request.build_opener(*handlers)
            with opener.open(req, timeout=timeout) as resp:
                status, raw, resp_headers = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            status, resp_headers = exc.code, exc.headers
            try:
                raw = exc.read()
            except (OSError, http.client.HTTPException):
                raw = b""
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            error = TlsError if isinstance(reason, ssl.SSLCertVerificationError) else TransientError
            raise error(str(reason) or type(exc).__name__) from None
        if status >= 500:
            raise TransientError("server answered %d" % status)
        try:
            payload = json.loads(raw.decode("utf-8")) if raw else {}
        except ValueError:
            payload = {}
        return Response(status, payload, resp_headers, raw)

    def adjust_clock(self, response):
        """A 401 may only mean our clock is off: sign with the server's time from then on."""
        try:
            server_time = parsedate_to_datetime(response.headers.get("Date")).timestamp()
        except (TypeError, ValueError, AttributeError):
            return False
        offset = server_time - time.time()
        # Well inside the server's future window (30 s by default), above the Date header's
        # one-second grain and a slow answer's delay.
        if abs(offset - self.clock_offset) < CLOCK_TOLERANCE:
            return False
        log("warn", "clock differs from the server's; signing with its time", offset_s=int(offset))
        self.clock_offset = offset
        return True


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def register(agent):
    """Trade the server token for this agent's own credentials; blocks until it succeeds or the
    agent is stopped. Registering again rotates the credentials, so it happens only when the
    state dir has none or the server refuses them and a server token was given."""
    body = {
        "server_token": agent.args.server_token,
        "hostname": socket.gethostname(),
        "version": __version__,
        "os": platform.system().lower(),
        "arch": platform.machine(),
        "rpc_port": agent.rpc_port(),
        "signing": "hmac-sha256",
    }
    body["machine_id"], body["instance_id"] = machine_identity(agent.args.state_dir)
    backoff, refused_backoff = Backoff(), Backoff(cap=REGISTER_BACKOFF_CAP)
    while not agent.stopping.is_set():
        try:
            resp = agent.blocking_call(
                agent.client.request, "POST", "/api/agents/register/", body, signed=False
            )
        except TlsError as exc:
            log("error", "the server's certificate does not verify; not registering", error=exc)
            agent.stopping.wait(refused_backoff.next_delay())
            continue
        except TransientError as exc:
            log("warn", "registration failed, retrying", error=exc)
            agent.stopping.wait(backoff.next_delay())
            continue
        backoff.reset()
        if resp.status in (200, 201) and resp.data.get("token") and resp.data.get("secret_key"):
            creds = {
                "server": agent.client.server_url,
                "agent_id": resp.data.get("agent_id"),
                "server_id": resp.data.get("server_id"),
                "token": str(resp.data["token"]),
                "secret_key": str(resp.data["secret_key"]),
                "machine_id": body["machine_id"],
            }
            port = resp.data.get("rpc_port")
            if isinstance(port, int) and 0 < port <= 65535:
                creds["rpc_port"] = port  # the port the server knows: tried first after a restart
            save_credentials(agent.args.state_dir, creds)
            agent.client.credentials = creds
            agent.client.pin_ca(resp.data.get("ca_certificate"))
            agent.adopt_config(resp.data.get("config"))
            log("info", "registered", agent_id=creds["agent_id"], server=creds["server"])
            return True
        log("error", "registration refused", status=resp.status, error=resp.error_message())
        agent.stopping.wait(refused_backoff.next_delay())
    return False


# ---------------------------------------------------------------------------------------------
# Poll loop (main thread)
# ---------------------------------------------------------------------------------------------


def poll_forever(agent):
    """Long-poll for work until stopped; every poll is also the agent's heartbeat. The waits
    between polls (backoff, poll_interval) end early when the server calls POST /wake."""
    backoff = Backoff()
    refused_backoff = Backoff(cap=REGISTER_BACKOFF_CAP)
    next_prune = time.monotonic() + PRUNE_INTERVAL
    while not agent.stopping.is_set():
        if agent.pending_upgrade:
            confirm_upgrade(agent)
        wait = float(agent.config.get("long_poll_timeout") or 0) if agent.config_known else 0.0
        query = "wait=%s&version=%s&rpc_port=%d" % (
            _seconds(wait),
            quote(__version__),
            agent.rpc_port(),
        )
        held = agent.runner.holding()
        if held:
            query += "&holding=" + ",".join(held)
        path = "/api/agents/poll_commands/?" + query
        started = time.monotonic()
        agent.woken.clear()  # a wake from now on asks for the poll after this one
        try:
            resp = agent.blocking_call(agent.client.request, "GET", path, timeout=wait + 10)
        except TlsError as exc:
            log("error", "the server's certificate does not verify; not polling", error=exc)
            agent.idle(backoff.next_delay())
            continue
        except TransientError as exc:
            log("warn", "poll failed", error=exc)
            agent.idle(backoff.next_delay())
            continue
        if resp.status == 401:
            handle_refused(agent, resp, refused_backoff)
            continue
        if resp.status != 200:
            log("warn", "poll refused", status=resp.status, error=resp.error_message())
            agent.idle(max(backoff.next_delay(), retry_after(resp)))
            continue
        backoff.reset()
        refused_backoff.reset()
        agent.polled_ok = True
        had_config = agent.config_known
        agent.adopt_config(resp.data.get("config"))
        commands = resp.data.get("commands") or []
        cancels = resp.data.get("cancel") or []
        for spec in commands:
            if isinstance(spec, dict):
                accept_command(agent, spec)
        for cid in cancels:
            agent.runner.cancel(str(cid))
        if time.monotonic() > next_prune:
            agent.journal.prune()
            next_prune = time.monotonic() + PRUNE_INTERVAL
        if not commands and not cancels and had_config:
            if wait <= 0:
                agent.idle(float(agent.config.get("poll_interval") or 1))
            elif time.monotonic() - started < 0.05:
                agent.idle(0.1)  # the server did not hold the poll: don't spin


def retry_after(resp):
    """A 429's Retry-After in seconds (0 when absent or not a number), at most 5 minutes."""
    value = (resp.headers.get("Retry-After") or "").strip() if resp.headers else ""
    return min(int(value), 300) if value.isdigit() else 0


def _seconds(value):
    return ("%.3f" % value).rstrip("0").rstrip(".")


def handle_refused(agent, resp, backoff):
    """401: the token is revoked, rotated, or our clock is off. Only an operator-supplied server
    token may mint a new identity; otherwise keep trying in case the server recovers."""
    if resp.error_code() == "replayed":  # a proxy sent our request twice: sign anew
        log("warn", "server saw this request before", error=resp.error_message())
        agent.stopping.wait(backoff.next_delay())
        return
    log("warn", "server refused the agent's credentials", error=resp.error_message())
    if agent.client.adjust_clock(resp):
        return
    agent.stopping.wait(backoff.next_delay())
    if agent.args.server_token and not agent.stopping.is_set():
        log("info", "registering again with the server token")
        register(agent)


def accept_command(agent, spec):
    cid = str(spec.get("id", ""))
    if not SAFE_ID.match(cid):
        log("warn", "ignoring a command with an unusable id", id=cid)
        return
    if agent.stopping.is_set():
        return  # not journaled: the server hands it out again after the lease
    if agent.journal.knows(cid):
        agent.sender.redelivered(cid)
        return
    # A payload (a certificate's private key) is kept in memory only, never journaled: after a
    # restart the command reports it has none, and the server issues another.
    payload = spec.pop("payload", None)
    entry = {
        "id": cid,
        "spec": spec,
        "state": "accepted",
        "accepted_at": time.time(),
        "max_output_bytes": int(agent.config.get("max_output_bytes") or 0),
    }
    run = Run(entry)
    run.payload = payload
    try:
        agent.journal.save(entry)
    except OSError as exc:  # not journaled, not run: the server hands it out again later
        log("error", "cannot journal the command", id=cid, error=exc)
        return
    agent.journal.add(run)
    log("info", "command accepted", id=cid, kind=spec.get("kind", "shell"))
    problem = check_spec(spec)
    if problem:
        agent.runner.finish_unstarted(run, "failed", problem)
    else:
        agent.runner.submit(run)


def check_spec(spec):
    """Returns why the command cannot run, or None. An internal command this version does not
    know is refused rather than guessed at."""
    kind = spec.get("kind") or "shell"
    if kind == "internal":
        if spec.get("command") not in INTERNAL_COMMANDS:
            return "unsupported internal command %r" % spec.get("command")
        return None
    if kind != "shell":
        return "unsupported command kind %r" % kind
    if not isinstance(spec.get("command"), str) or not spec["command"]:
        return "command is missing"
    if spec.get("args") is not None and not isinstance(spec["args"], list):
        return "args must be a list"
    return None


# ---------------------------------------------------------------------------------------------
# Running a command
# ---------------------------------------------------------------------------------------------


def read_boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def proc_stat(pid):
    """Fields 3.. of /proc/<pid>/stat (state, ppid, pgrp, ...), or None if there is no such pid."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except (OSError, ValueError):
        return None
    return data[data.rindex(b")") + 2 :].split()


def process_start_time(pid):
    """Field 22 (start time in clock ticks since boot): tells our process from a reused pid."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def group_alive(pgid):
    """True while a process that is not a zombie remains in the group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = proc_stat(int(name))
            if fields and len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
                return True
    return False


def signal_group(pgid, signum):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def terminate_group(pgid, grace):
    """TERM, then KILL once `grace` has passed; waits briefly for the group to be gone."""
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_alive(pgid):
        signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 1.0
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.02)


def exit_code_of(returncode):
    if returncode is None:
        return None
    return returncode if returncode >= 0 else 128 - returncode


class Runner:
    """Worker threads that run accepted commands, up to --max-concurrent at once; the rest wait
    in a local queue so that a long job never holds up the next one."""

    def __init__(self, agent):
        self.agent = agent
        self.queue = queue.Queue()
        self.threads = [
            threading.Thread(target=self.work, name="worker-%d" % i, daemon=True)
            for i in range(agent.args.max_concurrent)
        ]
        self.shell = ["bash", "-c"]
        # While an upgrade drains, new commands are held (they stay `accepted` on disk and run
        # after the exec, or here again if the upgrade stops short); `busy` counts the shell
        # commands between being taken by a worker and finishing. Internal commands run one at
        # a time, so one drain owns `draining`.
        self.gate = threading.Lock()
        self.draining = False
        self.held = []
        self.busy = 0
        self.internal_lock = threading.Lock()

    def start(self):
        for thread in self.threads:
            thread.start()

    def submit(self, run):
        self.queue.put(run)

    def holding(self):
        """The ids accepted but not started (waiting in the local queue, or held by a drain),
        oldest first: the poll lists them, so the server keeps their leases instead of
        handing them out again while they wait."""
        with self.agent.journal.lock:
            runs = list(self.agent.journal.active.values())
        waiting = [r for r in runs if r.state == "accepted" and r.id.isdigit()]
        waiting.sort(key=lambda r: (r.entry.get("accepted_at") or 0, int(r.id)))
        return [r.id for r in waiting[:HOLDING_MAX]]

    def stop(self, timeout):
        for _ in self.threads:
            self.queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    def work(self):
        while True:
            run = self.queue.get()
            if run is None:
                return
            if self.agent.stopping.is_set():
                continue  # stays `accepted` on disk and runs after the restart
            internal = is_internal(run.entry.get("spec"))
            with self.gate:
                if self.draining and not internal:
                    self.held.append(run)
                    continue
                self.busy += not internal
            try:
                if internal:
                    with self.internal_lock:
                        self.execute_internal(run)
                else:
                    self.execute(run)
            except Exception as exc:  # a bug must not take the worker or the command down silently
                trace = traceback.format_exc()
                log("error", "worker failed", id=run.id, error=repr(exc), trace=trace)
                try:
                    if run.state == "started" and run.entry.get("pid"):
                        terminate_group(run.entry["pid"], self.agent.args.kill_grace)
                    if run.state in ("accepted", "started"):
                        self.finish(run, {"status": "failed", "error": "agent error: %r" % exc})
                except Exception as again:
                    log("error", "could not record the failure", id=run.id, error=repr(again))
            finally:
                with self.gate:
                    self.busy -= not internal

    def drain(self, steps):
        """Hold new commands and wait until the running ones end: an exec would cut their
        pipes. Every command has a timeout, so this ends."""
        with self.gate:
            self.draining = True
        told = False
        while True:
            with self.gate:
                others = self.busy
            if others <= 0:
                return
            if not told:
                steps.say("waiting for %d running command(s) to finish" % others)
                told = True
            steps.check_cancel()
            time.sleep(0.1)

    def undrain(self):
        with self.gate:
            self.draining = False
            held, self.held = self.held, []
        for run in held:
            self.submit(run)

    def mark_started(self, run):
        """accepted -> started, durable before anything runs: after any crash this id is never
        run again. False when a cancel (or another worker) got to the run first."""
        with run.lock:
            if run.state != "accepted":
                return False
            run.entry["state"] = "started"
            run.entry["started_at"] = time.time()
            run.entry["boot_id"] = self.agent.boot_id
            self.agent.journal.save(run.entry, durable=True)
        run.started_mono = time.monotonic()
        return True

    def execute_internal(self, run):
        """An upgrade, stop or certificate update, reported like any command; what follows it
        (exec, stop) happens once its result has reached the server, or is at least on disk."""
        spec = run.entry["spec"]
        if not self.mark_started(run):
            return
        self.agent.sender.add(run)
        actions = {"upgrade": upgrade, "stop": stop, "update_certificate": update_certificate}
        action = actions[spec["command"]]
        try:
            outcome = action(self.agent, run)
        except Cancelled as exc:
            outcome = {"status": "cancelled", "error": str(exc)}
        except (LifecycleError, TransientError, OSError) as exc:
            outcome = {"status": "failed", "error": str(exc)}
        except Exception as exc:  # a bug: report it, and never leave new commands held
            log("error", "internal command failed", id=run.id, trace=traceback.format_exc())
            outcome = {"status": "failed", "error": "agent error: %r" % exc}
        then = outcome.pop("then", None)
        outcome.pop("note", None)
        if then != "exec":
            self.undrain()
        if then == "stop" and run.cancel_requested:
            outcome = {"status": "cancelled", "error": "cancelled by the server"}
            then = None
        outcome.update(started_at=run.entry["started_at"], finished_at=time.time())
        self.finish(run, outcome)
        if then:
            self.agent.sender.wait_reported(run, REPORT_WAIT)
            if then == "exec":
                reexec(self.agent)
            else:
                os.kill(os.getpid(), signal.SIGTERM)

    def cancel(self, cid):
        run = self.agent.journal.get(cid)
        if run is None:
            if not SAFE_ID.match(cid):
                return
            if self.agent.journal.knows(cid):
                self.agent.sender.redelivered(cid)  # reported already: say so again
            else:
                self.cancel_unknown(cid)
            return
        log("info", "cancel requested", id=cid)
        # The worker picks a run up or a cancel arrives: whichever takes the lock first wins.
        run.cancel_requested = True  # a running command is killed within one select tick
        if run.state == "accepted":
            self.finish_unstarted(run, "cancelled", "cancelled before it started")

    def cancel_unknown(self, cid):
        """A cancel for a command this agent never received (its delivery was lost): journal
        the id, so that a late delivery does not run it, and report it cancelled."""
        entry = {"id": cid, "spec": {"id": cid}, "state": "accepted", "accepted_at": time.time()}
        run = Run(entry)
        try:
            self.agent.journal.save(entry)
        except OSError as exc:
            log("error", "cannot journal the command", id=cid, error=exc)
            return
        self.agent.journal.add(run)
        log("info", "cancel for a command never received", id=cid)
        self.finish_unstarted(run, "cancelled", "cancelled before the agent received it")

    def finish_unstarted(self, run, status, error):
        now = time.time()
        result = {"status": status, "error": error, "started_at": now, "finished_at": now}
        self.finish(run, result, only_if="accepted")

    def finish(self, run, result, only_if=None):
        """Record the result in the journal and hand it to the sender."""
        result.setdefault("success", result.get("status") == "succeeded")
        for stream in STREAMS:
            result[stream + "_size"] = run.stored[stream]
        with run.lock:
            if only_if and run.state != only_if:
                return
            run.entry["result"] = result
            run.entry["state"] = "done"
            self.agent.journal.save(run.entry)
        self.agent.sender.add(run)
        fields = {"status": result["status"], "exit_code": result.get("exit_code")}
        if result.get("error"):
            fields["error"] = result["error"]
        log("info", "command finished", id=run.id, **fields)

    def argv_for(self, spec):
        if spec.get("args") is not None:  # an empty list still means argv, not a shell
            return [spec["command"]] + [str(a) for a in spec["args"]]
        return self.shell + [spec["command"]]

    def execute(self, run):
        spec = run.entry["spec"]
        argv = self.argv_for(spec)
        journal = self.agent.journal
        if not self.mark_started(run):
            return
        spool = SpoolWriter(self.agent, run)
        try:
            try:
                with stop_signals_unblocked():
                    proc = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        start_new_session=True,
                        close_fds=True,
                    )
            except OSError as exc:
                code = 127 if isinstance(exc, FileNotFoundError) else 126
                result = {"status": "failed", "exit_code": code, "error": str(exc)}
                result.update(started_at=run.entry["started_at"], finished_at=time.time())
                self.finish(run, result)
                return
            with run.lock:
                run.entry["pid"] = proc.pid
                run.entry["proc_start_time"] = process_start_time(proc.pid)
                journal.save(run.entry)
            log("info", "command started", id=run.id, pid=proc.pid)
            self.agent.sender.add(run)
            reason = self.pump(run, proc, spool)
        finally:
            spool.close()
        self.finish(run, self.result_of(run, proc.returncode, reason))

    def result_of(self, run, returncode, reason):
        result = {
            "exit_code": exit_code_of(returncode),
            "started_at": run.entry["started_at"],
            "finished_at": time.time(),
        }
        timeout = run.entry["spec"].get("timeout")
        if reason == "timeout":
            result.update(status="timed_out", error="timed out after %s s" % timeout)
        elif reason == "cancel":
            result.update(status="cancelled", error="cancelled")
        elif reason == "stop":
            result.update(status="failed", error="agent stopped while the command ran")
        elif returncode == 0:
            result.update(status="succeeded")
        else:
            result.update(status="failed")
            if returncode is not None and returncode < 0:
                result["error"] = "killed by signal %d" % -returncode
        if run.dropped:  # the sender declares them, and the server counts them exactly
            log("warn", "output dropped before it was sent", id=run.id, dropped_bytes=run.dropped)
        if result["exit_code"] is None:
            del result["exit_code"]
        return result

    def kill_reason(self, run, now, deadline):
        if run.cancel_requested:
            return "cancel"
        if self.agent.stopping.is_set():
            return "stop"
        if deadline is not None and now >= deadline:
            return "timeout"
        return None

    def pump(self, run, proc, spool):
        """Copy the pipes into the spool until EOF and exit, killing the group on timeout,
        cancel or stop. Returns why it killed, or None."""
        spec = run.entry["spec"]
        timeout = spec.get("timeout")
        deadline = run.started_mono + float(timeout) if timeout and float(timeout) > 0 else None
        grace = self.agent.args.kill_grace
        reason = term_at = kill_at = exited_at = None
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ, "stdout")
        selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
        try:
            while True:
                now = time.monotonic()
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if not selector.get_map() and exited_at is not None:
                    break
                if term_at is None:
                    if exited_at is None:
                        reason = self.kill_reason(run, now, deadline)
                        if reason:
                            log("info", "killing command", id=run.id, reason=reason)
                            signal_group(proc.pid, signal.SIGTERM)
                            term_at = now
                    elif now - exited_at >= ORPHAN_PIPE_GRACE:
                        log("warn", "background processes hold the output; killing them", id=run.id)
                        signal_group(proc.pid, signal.SIGTERM)
                        term_at = now
                elif kill_at is None and now - term_at >= grace:
                    signal_group(proc.pid, signal.SIGKILL)
                    kill_at = now
                elif kill_at is not None and now - kill_at >= 1.0:
                    log("warn", "pipes still open after SIGKILL; giving up on them", id=run.id)
                    break
                tick = 0.2
                if deadline is not None and term_at is None:
                    tick = min(tick, max(0.005, deadline - now))
                if not selector.get_map():
                    # Pipes closed, process still running: wait for it directly.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=tick)
                    continue
                for key, _ in selector.select(tick):
                    data = os.read(key.fileobj.fileno(), READ_SIZE)
                    if not data:
                        selector.unregister(key.fileobj)
                        continue
                    spool.write(key.data, data)
        finally:
            selector.close()
            proc.stdout.close()
            proc.stderr.close()
        try:
            proc.wait(timeout=grace + 1 if term_at is not None else None)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        if term_at is not None:
            # Stragglers of the group (background children) must not outlive a kill.
            terminate_group(proc.pid, max(0.0, grace - (time.monotonic() - term_at)))
        return reason

    def recover(self):
        """Pick up what the previous agent process left in the journal."""
        journal = self.agent.journal
        journal.remove_stale_tmp()
        to_run = []
        for cid in journal.ids():
            entry = journal.load(cid)
            if entry is None:
                log("warn", "unreadable journal entry; reporting the command lost", id=cid)
                entry = {"id": cid, "state": "started", "spec": {}}
            entry["id"] = cid
            state = entry.get("state")
            if state == "reported":
                journal.reported.add(cid)
                continue
            run = Run(entry)
            journal.add(run)
            if state == "accepted":
                to_run.append(run)
            elif state == "started":
                self.recover_interrupted(run)
            else:  # done, not yet reported: the result says how long each stream was
                for stream in STREAMS:
                    run.segments[stream] = journal.load_segments(cid, stream)
                self.agent.sender.add(run)
        journal.prune()
        to_run.sort(key=lambda r: r.entry.get("accepted_at") or 0)
        for run in to_run:
            log("info", "running a command accepted before the restart", id=run.id)
            self.submit(run)

    def recover_interrupted(self, run):
        """A command that was running when the agent died is never run again: kill what is left
        of it and report it lost, with whatever output the spool kept."""
        entry = run.entry
        pid = entry.get("pid")
        same_boot = entry.get("boot_id") is None or entry.get("boot_id") == self.agent.boot_id
        if pid and same_boot:
            leader_start = process_start_time(pid)
            ours = leader_start is None or leader_start == entry.get("proc_start_time")
            if ours and group_alive(pid):
                log("warn", "killing processes left by an interrupted command", id=run.id, pgid=pid)
                terminate_group(pid, self.agent.args.kill_grace)
        for stream in STREAMS:  # the spool says how far each stream got
            segments = self.agent.journal.load_segments(run.id, stream)
            run.segments[stream] = segments
            run.stored[stream] = segments[-1][0] + segments[-1][1] if segments else 0
        now = time.time()
        result = {"status": "lost", "error": "agent restarted while the command ran"}
        result.update(started_at=entry.get("started_at") or now, finished_at=now)
        self.finish(run, result)


# ---------------------------------------------------------------------------------------------
# Output spooling and sending
# ---------------------------------------------------------------------------------------------


class SpoolWriter:
    """Spools a running command's output, each stream in files named by the offset of their
    first byte: the head (the first `window // 2` bytes, as the server keeps them), then tail
    segments. Once the tail files hold more than the tail window without their oldest, the
    oldest is deleted: a stream of any length costs at most window + one segment of disk, and
    its last bytes (usually the error) are always kept. Bytes deleted before the sender took
    them, or lost to a full disk, are a gap the sender declares (docs/agent-protocol.md)."""

    def __init__(self, agent, run):
        self.agent = agent
        self.run = run
        # The server's cap per stream: it sends twice that as max_output_bytes (both streams).
        total = run.entry.get("max_output_bytes") or DEFAULT_REMOTE_CONFIG["max_output_bytes"]
        window = max(2, int(total) // 2)
        self.head = window // 2
        self.tail = window - self.head
        self.segment_size = max(MIN_SEGMENT_BYTES, self.tail // 4)
        self.files = {}  # stream -> (its last segment, open fd)
        self.failed = False

    def write(self, stream, data):
        run = self.run
        while data:
            target = self.target(stream)
            if target is None:  # no file for it: the bytes are lost
                self.lose(stream, len(data), None)
                break
            segment, fd, room = target
            piece = memoryview(data)[:room]
            written = 0
            try:
                while written < len(piece):
                    written += os.write(fd, piece[written:])
            except OSError as exc:  # disk full: the command goes on, these bytes are lost
                self.add(stream, segment, written)
                self.close_file(stream)
                if not segment[1]:  # an empty file would cost a call of its own to send
                    self.discard(stream, segment)
                self.lose(stream, len(data) - written, exc)
                break
            self.add(stream, segment, written)
            data = data[written:]
        self.trim(stream)
        if run.pending(stream) >= STREAM_EAGER_BYTES:
            self.agent.sender.wake()

    def target(self, stream):
        """The open file the next byte of `stream` goes to, and how many bytes it takes."""
        pos = self.run.stored[stream]
        current = self.files.get(stream)
        if current is not None:
            segment, fd = current
            room = self.limit(segment[0]) - pos
            if segment[0] + segment[1] == pos and room > 0:
                return segment, fd, room
            self.close_file(stream)
        path = self.agent.journal.segment_path(self.run.id, stream, pos)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        except OSError as exc:
            self.note_failure(exc)
            return None
        segment = [pos, 0]
        with self.run.spool_lock:
            self.run.segments[stream].append(segment)
        self.files[stream] = (segment, fd)
        return segment, fd, self.limit(pos) - pos

    def limit(self, start):
        """Where a file that starts at `start` ends: the head's end, or one segment on."""
        return self.head if start < self.head else start + self.segment_size

    def add(self, stream, segment, count):
        with self.run.spool_lock:
            segment[1] += count
        self.run.stored[stream] += count

    def discard(self, stream, segment):
        with self.run.spool_lock:
            self.run.segments[stream].remove(segment)
            with contextlib.suppress(OSError):
                os.unlink(self.agent.journal.segment_path(self.run.id, stream, segment[0]))

    def lose(self, stream, count, exc):
        self.note_failure(exc)
        self.run.stored[stream] += count
        self.run.dropped += count

    def note_failure(self, exc):
        if exc is not None and not self.failed:
            self.failed = True
            log("error", "cannot spool output", id=self.run.id, error=exc)

    def trim(self, stream):
        """Delete the oldest tail files while the newer ones still hold the tail window."""
        run = self.run
        with run.spool_lock:
            segments = run.segments[stream]
            tail = [s for s in segments if s[0] >= self.head]
            kept = sum(s[1] for s in tail)
            while len(tail) > 1 and kept - tail[0][1] >= self.tail:
                start, length = oldest = tail.pop(0)
                with contextlib.suppress(OSError):
                    os.unlink(self.agent.journal.segment_path(run.id, stream, start))
                segments.remove(oldest)
                kept -= length
                run.dropped += max(0, start + length - max(start, run.acked[stream]))

    def close_file(self, stream):
        current = self.files.pop(stream, None)
        if current is not None:
            with contextlib.suppress(OSError):
                os.close(current[1])

    def close(self):
        for stream in STREAMS:
            self.close_file(stream)


def encode_chunks(chunks, final):
    """Text when both chunks are UTF-8, base64 otherwise (the encoding covers the whole call).
    While more output may follow (`final[stream]` false), a character cut at the chunk's end
    waits for the next call."""
    texts = {}
    for stream in STREAMS:
        data = chunks[stream]
        try:
            texts[stream] = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            cut = exc.reason == "unexpected end of data" and len(data) - exc.start < 4
            if cut and not final[stream]:
                try:
                    texts[stream] = data[: exc.start].decode("utf-8")
                    chunks[stream] = data[: exc.start]
                    continue
                except UnicodeDecodeError:
                    pass
            texts = None
            break
    if texts is not None:
        return {"stdout": texts["stdout"], "stderr": texts["stderr"], "encoding": "utf-8"}
    return {
        "stdout": base64.b64encode(chunks["stdout"]).decode("ascii"),
        "stderr": base64.b64encode(chunks["stderr"]).decode("ascii"),
        "encoding": "base64",
    }


class Sender:
    """One thread that moves spooled output and results to the server. It is woken at once when
    there is something to send, and otherwise ticks every STREAM_INTERVAL while commands run.
    Each run has its own backoff, so one refused or failing command does not stall the rest."""

    def __init__(self, agent):
        self.agent = agent
        self.client = agent.client
        self.journal = agent.journal
        self.event = threading.Event()
        self.lock = threading.Lock()
        self.outbox = {}  # id -> Run with something still to send
        self.thread = threading.Thread(target=self.loop, name="sender", daemon=True)

    def start(self):
        self.thread.start()

    def wake(self):
        self.event.set()

    def add(self, run):
        with self.lock:
            self.outbox[run.id] = run
        self.event.set()

    def redelivered(self, cid):
        """The server handed out an id we already have: the ack or result is on its way, or it
        was lost, in which case the result is sent again."""
        run = self.journal.get(cid)
        if run is not None and run.state != "reported":
            if run.state == "done":
                run.retry_at = 0.0
                self.event.set()
            return
        entry = self.journal.load(cid)
        if entry and entry.get("state") == "reported" and entry.get("result"):
            log("info", "command delivered again after its result; resending the result", id=cid)
            run = Run(entry)
            run.resend_result = True
            self.add(run)

    def wait_reported(self, run, timeout):
        """Until the run's result is acknowledged (else it stays on disk and is resent)."""
        deadline = time.monotonic() + timeout
        while run.state != "reported" and time.monotonic() < deadline:
            self.event.set()
            time.sleep(0.02)

    def unsent_results(self):
        with self.lock:
            return sum(1 for r in self.outbox.values() if r.state == "done" or r.resend_result)

    def loop(self):
        while True:
            self.event.wait(self.next_timeout())
            self.event.clear()
            with self.lock:
                runs = list(self.outbox.values())
            for run in runs:
                try:
                    self.service(run)
                except Exception as exc:  # keep sending for the other commands; say why
                    trace = traceback.format_exc()
                    log("error", "sender failed", id=run.id, error=repr(exc), trace=trace)
                    run.retry_at = time.monotonic() + run.backoff.next_delay()

    def next_timeout(self):
        now = time.monotonic()
        due = None
        with self.lock:
            runs = list(self.outbox.values())
        for run in runs:
            if run.retry_at > now:
                when = run.retry_at
            elif run.state == "done" or run.resend_result:
                when = now
            elif run.state == "started" and not run.acknowledged and not run.progress_refused:
                when = run.started_mono + ACK_DELAY
            else:
                when = now + STREAM_INTERVAL
            due = when if due is None else min(due, when)
        return None if due is None else max(0.0, due - now)

    def service(self, run):
        now = time.monotonic()
        if run.retry_at > now:
            return
        if run.resend_result:
            self.send_result(run, resend=True)
        elif run.state == "done":
            self.send_result(run)
        elif run.state == "started" and not run.progress_refused:
            pending = max(run.pending("stdout"), run.pending("stderr"))
            if not run.acknowledged:
                if now - run.started_mono >= ACK_DELAY:
                    self.send_progress(run)
            elif pending >= STREAM_EAGER_BYTES or (
                pending and now - run.last_sent_mono >= STREAM_INTERVAL
            ):
                self.send_progress(run)

    def take_chunks(self, run):
        """The next unacknowledged bytes of each stream, read back from the spool: per stream,
        (offset, bytes dropped right before it, the bytes, whether they stop at a gap)."""
        chunks = {}
        for stream in STREAMS:
            start = run.acked[stream]
            if start < run.stored[stream]:
                size = min(run.pending(stream), run.chunk_limit)
                chunks[stream] = self.journal.read_spool(run, stream, start, size)
            else:
                chunks[stream] = (start, 0, b"", False)
        return chunks

    def build_output(self, run, final):
        """Output fields for one call, shrunk until the body fits the server's request limit,
        and where each stream's acknowledged end will be once the server takes it."""
        while True:
            taken = self.take_chunks(run)
            chunks = {stream: taken[stream][2] for stream in STREAMS}
            # Bytes that stop at a gap are never continued: a character cut there goes as is.
            fields = encode_chunks(chunks, {s: final or taken[s][3] for s in STREAMS})
            for stream in STREAMS:
                offset, dropped = taken[stream][:2]
                fields["offset_" + stream] = offset
                if dropped:
                    fields["dropped_" + stream] = dropped
            size = len(json_bytes(fields))
            if size <= MAX_BODY_BYTES - 4096 or run.chunk_limit <= 4096:
                return fields, {s: taken[s][0] + len(chunks[s]) for s in STREAMS}
            run.chunk_limit //= 2

    def post(self, run, kind, body):
        """One attempt; None means "try again later" (the run's backoff is armed)."""
        path = "/api/agents/command/%s/%s/" % (run.id, kind)
        try:
            resp = self.client.request("POST", path, data=json_bytes(body))
        except TransientError as exc:
            self.retry_later(run, "%s failed" % kind, exc)
            return None
        if resp.status == 401:
            self.agent.client.adjust_clock(resp)  # the poll loop may not have met it yet
            self.retry_later(run, "%s refused: credentials" % kind, resp.error_message())
            return None
        if resp.status == 413 and run.chunk_limit > 4096:
            run.chunk_limit //= 2
            return None
        if resp.status < 400 or resp.status == 409:
            run.backoff.reset()
        return resp

    def retry_later(self, run, message, error):
        run.retry_at = time.monotonic() + run.backoff.next_delay()
        if run.backoff.failures in (1, 10) or run.backoff.failures % 50 == 0:
            log("warn", message, id=run.id, error=error, attempts=run.backoff.failures)

    def resync(self, run, resp, body):
        """409 offset_gap: the server stores fewer bytes than we thought; send from its end."""
        error = resp.data.get("error")
        expected = error.get("expected") if isinstance(error, dict) else None
        if resp.error_code() != "offset_gap" or not isinstance(expected, dict):
            return False
        if any(self.hole_refused(body, expected, s) for s in STREAMS):
            # A hole that reached its end, refused: a server of an earlier release, which does
            # not take declared holes. Report what it has instead of asking again for ever.
            log("warn", "the server takes no declared holes; output stops here", id=run.id)
            run.progress_refused = True
            self.event.set()
            return True
        run.conflicts += 1
        for stream in STREAMS:
            if isinstance(expected.get(stream), int):
                run.acked[stream] = expected[stream]
        if run.conflicts > 5:  # the server keeps asking for something odd: slow down
            run.retry_at = time.monotonic() + run.backoff.next_delay()
        else:
            self.event.set()
        return True

    @staticmethod
    def hole_refused(body, expected, stream):
        hole, end = body.get("dropped_" + stream), expected.get(stream)
        return bool(hole) and isinstance(end, int) and end >= body["offset_" + stream] - hole

    def send_progress(self, run):
        fields, sent = self.build_output(run, final=False)
        body = dict(fields, append=True)
        if not run.acknowledged:
            body["started_at"] = run.entry.get("started_at")
        resp = self.post(run, "progress", body)
        if resp is None:
            return
        if resp.status == 200:
            run.acknowledged = True
            run.conflicts = 0
            run.last_sent_mono = time.monotonic()
            run.acked.update(sent)
            if max(run.pending("stdout"), run.pending("stderr")) >= STREAM_EAGER_BYTES:
                self.event.set()  # more is waiting: come back without waiting for the tick
            if resp.data.get("cancel"):
                self.agent.runner.cancel(run.id)
            if run.last_sent_mono - run.offsets_saved_mono >= OFFSET_SAVE_INTERVAL:
                run.offsets_saved_mono = run.last_sent_mono
                with run.lock:
                    run.entry["offsets"] = dict(run.acked)
                    self.journal.save(run.entry)
        elif not (resp.status == 409 and self.resync(run, resp, body)):
            error = resp.error_message()
            log("error", "progress refused", id=run.id, status=resp.status, error=error)
            run.progress_refused = True  # from now on only the result is sent

    def send_result(self, run, resend=False):
        result = run.entry["result"]
        body = dict(result, append=True)
        if resend or run.progress_refused:
            # The spool is gone, or the server takes no output for this command: claim only
            # what it acknowledged, so that it does not ask for bytes it will not get.
            body["stdout_size"] = run.acked["stdout"]
            body["stderr_size"] = run.acked["stderr"]
        else:
            if run.pending("stdout") or run.pending("stderr"):
                fields, reach = self.build_output(run, final=True)
                if reach != run.stored:
                    self.send_progress(run)  # more than one call: output first, then the result
                    return
                body.update(fields)
            body["stdout_size"] = run.stored["stdout"]
            body["stderr_size"] = run.stored["stderr"]
        resp = self.post(run, "result", body)
        if resp is None:
            return
        if (
            resp.status == 409
            and not resend
            and run.conflicts < 20
            and self.resync(run, resp, body)
        ):
            return
        if resp.status != 200:
            error = resp.error_message()
            log("error", "result refused; giving up", id=run.id, status=resp.status, error=error)
        self.mark_reported(run)

    def mark_reported(self, run):
        with run.lock:
            run.entry["state"] = "reported"
            run.entry["reported_at"] = time.time()
            run.entry["offsets"] = dict(run.acked)
            self.journal.save(run.entry)
        run.resend_result = False
        self.journal.delete_spool(run.id)
        self.journal.mark_reported(run)
        with self.lock:
            if self.outbox.get(run.id) is run:  # not a resend queued meanwhile
                del self.outbox[run.id]
        log("info", "result reported", id=run.id, status=run.entry["result"].get("status"))


# ---------------------------------------------------------------------------------------------
# Lifecycle: upgrade and stop (internal commands)
# ---------------------------------------------------------------------------------------------

INTERNAL_COMMANDS = ("upgrade", "stop", "update_certificate")
UPGRADE_MARKER = "upgrade.json"
MANIFEST_MAX_AGE = 600  # seconds: an old signed manifest must not downgrade the agent
CHILD_CHECK_TIMEOUT = 60
REPORT_WAIT = 5.0  # how long an agent about to exec or stop waits for its result to land


class LifecycleError(Exception):
    """A step of an upgrade or stop failed; the message is what the operator reads."""


class Cancelled(LifecycleError):
    pass


def agent_file_path():
    return os.path.abspath(__file__)


def canonical_json(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def manifest_signature(secret_key, manifest):
    message = b"tether-manifest\n" + canonical_json(manifest)
    return hmac.new(secret_key.encode("ascii"), message, hashlib.sha256).hexdigest()


def check_manifest(body, secret_key, agent_id, now):
    """The manifest's files and version, if the server signed it for this agent lately."""
    manifest = body.get("manifest") if isinstance(body, dict) else None
    signature = body.get("signature") if isinstance(body, dict) else None
    if not isinstance(manifest, dict) or not isinstance(signature, str):
        raise LifecycleError("the manifest is malformed")
    expected = manifest_signature(secret_key, manifest)
    if not hmac.compare_digest(expected, signature):
        raise LifecycleError("the manifest's signature does not match: refusing the files")
    if agent_id is not None and str(manifest.get("agent_id")) != str(agent_id):
        raise LifecycleError("the manifest was issued for another agent")
    issued = manifest.get("issued_at")
    if not isinstance(issued, int) or abs(now - issued) > MANIFEST_MAX_AGE:
        raise LifecycleError("the manifest is too old (or our clock is off)")
    files = manifest.get("files")
    version = manifest.get("version")
    if not isinstance(files, dict) or "main.py" not in files or not isinstance(version, str):
        raise LifecycleError("the manifest names no main.py or no version")
    return version, files


class DeploymentLog:
    """Lines for the operator watching the deployment; the answer tells of a cancel."""

    def __init__(self, agent, deployment_id, run=None):
        self.agent = agent
        self.deployment_id = deployment_id
        self.run = run

    def say(self, message, failed=False):
        """`failed` ends the deployment as failed (the server lets an agent fail its own)."""
        log("info", "deployment step", deployment=self.deployment_id, step=message)
        if self.deployment_id is None:
            return
        path = "/api/agents/deployment/%s/progress/" % self.deployment_id
        body = {"log": message, "status": "failed"} if failed else {"log": message}
        try:
            resp = self.agent.client.request("POST", path, body)
        except TransientError as exc:
            log("warn", "deployment log not sent", error=exc)
            return
        cancelled = resp.status == 200 and resp.data.get("deployment_status") == "cancelled"
        if cancelled and self.run is not None:
            self.run.cancel_requested = True

    def check_cancel(self):
        if self.run is not None and self.run.cancel_requested:
            raise Cancelled("cancelled by the server")


def check_child(argv, what):
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=CHILD_CHECK_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LifecycleError("%s of the new file could not run: %s" % (what, exc)) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()[-500:]
        message = "%s of the new file failed (exit %s): %s" % (what, proc.returncode, tail)
        raise LifecycleError(message)
    return proc.stdout.decode("utf-8", "replace").strip()


def upgrade(agent, run):
    """Fetch, check and swap in the served agent, then ask to be re-executed. Everything before
    the swap can fail or be cancelled and leaves the running agent as it was."""
    spec = run.entry["spec"]
    steps = DeploymentLog(agent, spec.get("deployment_id"), run)
    client = agent.client
    creds = client.credentials or {}
    steps.say("fetching the signed manifest")
    resp = client.request("GET", "/api/agents/files/manifest.json/")
    if resp.status != 200:
        raise LifecycleError("the server refused the manifest (HTTP %d)" % resp.status)
    now = int(time.time() + client.clock_offset)
    secret_key, agent_id = creds.get("secret_key", ""), creds.get("agent_id")
    version, files = check_manifest(resp.data, secret_key, agent_id, now)
    if version == __version__:
        steps.say("already at version %s" % version)
        return {"status": "succeeded", "note": "already at %s" % version}
    steps.say("manifest ok: version %s, files %s" % (version, ", ".join(sorted(files))))
    target = agent_file_path()
    directory = os.path.dirname(target)
    staged = {}
    for name in sorted(files):
        if name not in ("main.py", "requirements.txt"):
            raise LifecycleError("the manifest names an unexpected file %r" % name)
        resp = client.request("GET", "/api/agents/files/%s/" % name, timeout=60)
        data = resp.raw
        want = files[name] if isinstance(files[name], dict) else {}
        if resp.status != 200 or hashlib.sha256(data).hexdigest() != want.get("sha256"):
            raise LifecycleError("%s does not match the manifest's SHA-256" % name)
        path = os.path.join(directory, name + ".new")
        write_file_atomic(path, data, durable=True, mode=0o755 if name == "main.py" else 0o644)
        staged[name] = path
    steps.say("downloaded and verified %s" % ", ".join(sorted(staged)))
    reported = check_child([sys.executable, staged["main.py"], "--version"], "--version")
    if reported != version:
        raise LifecycleError("the new file says version %r, the manifest %r" % (reported, version))
    check_child([sys.executable, staged["main.py"], "--self-test"], "--self-test")
    steps.say("self-test of version %s passed" % version)
    steps.check_cancel()
    agent.runner.drain(steps)
    steps.check_cancel()
    previous = target + ".prev"
    with open(target, "rb") as f:
        write_file_atomic(previous, f.read(), durable=True, mode=0o755)
    marker = {
        "deployment_id": spec.get("deployment_id"),
        "from_version": __version__,
        "to_version": version,
        "previous": previous,
        "deadline": time.time() + float(spec.get("confirm_within") or spec.get("timeout") or 60),
    }
    write_file_atomic(
        os.path.join(agent.args.state_dir, UPGRADE_MARKER), canonical_json(marker), durable=True
    )
    for name, path in staged.items():
        os.replace(path, os.path.join(directory, name))
    steps.say("swapped in version %s; restarting the agent" % version)
    return {"status": "succeeded", "then": "exec"}


def stop(agent, run):
    steps = DeploymentLog(agent, run.entry["spec"].get("deployment_id"), run)
    steps.check_cancel()
    steps.say("stopping the agent (running commands are stopped and reported)")
    steps.check_cancel()  # the answer to that line tells of a cancel
    return {"status": "succeeded", "then": "stop"}


def reexec(agent):
    """Become the file on disk: same interpreter, same arguments, same state dir. The journal
    carries everything unsent across (pipes do not survive exec, so nothing runs by now)."""
    argv = [sys.executable, agent_file_path()] + sys.argv[1:]
    log("info", "re-executing", file=agent_file_path())  # not argv: it may hold the token
    with _log_lock:
        sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # helper threads block SIGTERM; exec keeps masks
    os.execv(sys.executable, argv)


def check_upgrade_marker(agent):
    """After an upgrade's exec: the new version must reach the server before the deadline or
    the previous file is put back. After a rollback: say so and forget the upgrade."""
    path = os.path.join(agent.args.state_dir, UPGRADE_MARKER)
    marker = read_json(path)
    if not marker:
        return
    steps = DeploymentLog(agent, marker.get("deployment_id"))
    if marker.get("to_version") == __version__:
        agent.pending_upgrade = marker
        log("info", "upgraded; confirming with the server", version=__version__)
        return
    steps.say(
        "rolled back: version %s did not reach the server in time; back on version %s"
        % (marker.get("to_version"), __version__),
        failed=True,
    )
    with contextlib.suppress(OSError):
        os.remove(path)


def confirm_upgrade(agent):
    """Called after each poll: the server has seen our version once a poll succeeded."""
    marker = agent.pending_upgrade
    steps = DeploymentLog(agent, marker.get("deployment_id"))
    path = os.path.join(agent.args.state_dir, UPGRADE_MARKER)
    if agent.polled_ok:
        steps.say("agent running version %s (pid %d)" % (__version__, os.getpid()))
        with contextlib.suppress(OSError):
            os.remove(path)
        agent.pending_upgrade = None
        return
    if time.time() < float(marker.get("deadline") or 0):
        return
    log("error", "the upgraded agent did not reach the server in time; rolling back")
    previous = marker.get("previous")
    if not previous or not os.path.isfile(previous):
        log("error", "no previous file to roll back to", previous=previous)
        agent.pending_upgrade = None
        return
    os.replace(previous, agent_file_path())
    marker["rolled_back"] = True
    write_file_atomic(path, canonical_json(marker), durable=True)
    agent.shutdown()
    reexec(agent)


def is_internal(spec):
    return isinstance(spec, dict) and spec.get("kind") == "internal"


# ---------------------------------------------------------------------------------------------
# Certificates and the RPC endpoint (docs/agent-rpc.md)
#   Unless --no-rpc, the agent serves HTTPS with the certificate its server's CA issued
#   (`update_certificate` brings it): GET /status and POST /wake, each signed by the server
#   with the agent's secret key. It holds its port from the start (so the port it registers
#   with is the one it serves on), but until a certificate is installed nothing listens.
# ---------------------------------------------------------------------------------------------

RPC_CERT = "rpc.crt"
RPC_KEY = "rpc.key"
PINNED_CA = "ca.pem"
RPC_WINDOW = 30  # seconds between the caller's timestamp and our clock
RPC_MAX_BODY = 64 * 1024
RPC_REPLAY_MAX = 4096  # signatures remembered within the window; past that, refuse
RPC_HANDSHAKE_TIMEOUT = 5.0
RPC_MAX_CONNECTIONS = 16
RPC_REQUEST_DEADLINE = 10.0  # seconds from accept to the end of the answer
RPC_REQUEST_TIMEOUT = 10.0
RPC_POLL_INTERVAL = 0.5  # how soon the accept loop sees a close
DIGITS = re.compile(r"[0-9]{1,12}")


def _hang_up(sock):
    """Wake a handler still reading a connection past its deadline."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def rpc_context(cert_path, key_path):
    """The endpoint's TLS context; ssl.SSLError when the key does not match the certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return context


def update_certificate(agent, run):
    """Install the certificate the server issued for the RPC endpoint. The key was never
    journaled (accept_command keeps payloads in memory) and is dropped here."""
    try:
        context = install_certificate(agent.args.state_dir, run.payload)
    finally:
        run.payload = None
    agent.client.reload_tls()  # the pinned CA may have changed
    if agent.rpc is None:
        log("info", "certificate installed; the agent runs with --no-rpc, so nothing serves it")
    else:
        agent.rpc.install(context)
    return {"status": "succeeded"}


def install_certificate(state_dir, payload):
    """Write rpc.crt, rpc.key and ca.pem under temporary names, check that they load together,
    and only then rename them over the files in use: a bad delivery leaves the old ones (and
    the context serving them) as they were. Returns the new context."""
    if not isinstance(payload, dict):
        raise LifecycleError("the command carries no certificate")
    texts = {
        RPC_CERT: payload.get("certificate"),
        RPC_KEY: payload.get("private_key"),
        PINNED_CA: payload.get("ca_certificate"),
    }
    if not isinstance(texts[RPC_CERT], str) or not isinstance(texts[RPC_KEY], str):
        raise LifecycleError("the certificate or its private key is missing")
    if not isinstance(texts[PINNED_CA], str):
        del texts[PINNED_CA]  # keep the CA we have
    staged = {}
    try:
        for name, text in texts.items():
            staged[name] = os.path.join(state_dir, name + ".new")
            mode = 0o600 if name == RPC_KEY else 0o644
            write_file_atomic(staged[name], text.encode("utf-8"), durable=True, mode=mode)
        try:
            context = rpc_context(staged[RPC_CERT], staged[RPC_KEY])
        except (ssl.SSLError, ValueError) as exc:
            raise LifecycleError(
                "the certificate and key do not load together (the old ones stay): %s" % exc
            ) from None
        if PINNED_CA in staged:
            try:
                ssl.create_default_context(cafile=staged[PINNED_CA])
            except (ssl.SSLError, ValueError) as exc:
                raise LifecycleError("the CA certificate does not load: %s" % exc) from None
        for name in list(staged):
            os.replace(staged.pop(name), os.path.join(state_dir, name))
    finally:
        for path in staged.values():
            with contextlib.suppress(OSError):
                os.unlink(path)
    return context


class RpcHandler(http.server.BaseHTTPRequestHandler):
    """One request per connection. A request that is refused, malformed or unsigned is met with
    silence and a closed connection: a caller without the secret key learns nothing, not even
    that this is a Tether agent."""

    protocol_version = "HTTP/1.1"
    server_version = "tether-agent"
    sys_version = ""
    timeout = RPC_REQUEST_TIMEOUT

    def do_GET(self):
        self.serve("GET")

    def do_POST(self):
        self.serve("POST")

    def send_error(self, code, message=None, explain=None):
        """http.server answers a bad request line, an unknown method or huge headers itself;
        here they get the same silence as an unsigned request."""
        self.close_connection = True

    def handle_expect_100(self):
        return True  # no "100 Continue" before the request is known to be signed

    def log_message(self, format, *args):
        pass

    def serve(self, method):
        self.close_connection = True
        rpc = self.server.rpc
        body = self.read_body()
        if body is None:
            refusal = "body too large or unreadable"
        else:
            refusal = rpc.check(method, self.path, self.headers, body)
        if refusal:
            log("warn", "rpc request refused", peer=self.client_address[0], reason=refusal)
            return
        status, payload = rpc.answer(method, urlsplit(self.path).path)
        data = json_bytes(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def read_body(self):
        """The body, or None when it is chunked, larger than RPC_MAX_BODY or cut short."""
        length = self.headers.get("Content-Length") or "0"
        if self.headers.get("Transfer-Encoding") or not DIGITS.fullmatch(length):
            return None
        size = int(length)
        if size > RPC_MAX_BODY:
            return None
        data = self.rfile.read(size) if size else b""
        return data if len(data) == size else None


class RpcHTTPServer(http.server.ThreadingHTTPServer):
    """Accepts on one thread; each connection gets a daemon thread, which does the TLS
    handshake with the context current at that moment (so a new certificate serves new
    connections while open ones keep theirs) under a timeout (so a slow client holds only its
    own thread, never the accept loop)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address, rpc, reuse_address):
        """Bound to `address`, not yet listening (server_activate listens). `reuse_address`:
        take the port even over connections of an earlier run still in TIME_WAIT; without
        it the bind is exclusive, so that another agent choosing the same port fails."""
        self.rpc = rpc
        # Strangers can connect: a bounded number of connections, each with a deadline, so
        # that slow or idle ones cannot pile up threads.
        self.slots = threading.BoundedSemaphore(RPC_MAX_CONNECTIONS)
        self.allow_reuse_address = reuse_address
        http.server.ThreadingHTTPServer.__init__(self, address, RpcHandler, bind_and_activate=False)
        try:
            self.server_bind()
        except BaseException:
            self.server_close()
            raise

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            http.server.ThreadingHTTPServer.process_request(self, request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        deadline = threading.Timer(RPC_REQUEST_DEADLINE, _hang_up, args=(request,))
        deadline.daemon = True
        deadline.start()
        try:
            http.server.ThreadingHTTPServer.process_request_thread(self, request, client_address)
        finally:
            deadline.cancel()
            self.slots.release()

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)  # HTTPServer's also looks up our FQDN: slow
        self.server_name, self.server_port = self.server_address[:2]

    def finish_request(self, request, client_address):
        context = self.rpc.context
        try:
            request.settimeout(RPC_HANDSHAKE_TIMEOUT)
            conn = context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:
            log("info", "rpc handshake failed", peer=client_address[0], error=exc)
            return
        try:
            self.RequestHandlerClass(conn, client_address, self)
        except OSError:
            pass  # the caller went away or was too slow
        finally:
            conn.close()

    def handle_error(self, request, client_address):
        log("error", "rpc request failed", peer=client_address[0], trace=traceback.format_exc())


class DualStackRpcHTTPServer(RpcHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        RpcHTTPServer.server_bind(self)


def bind_rpc_server(rpc, port, reuse_address):
    """A server bound to `port` on every address, IPv6 and IPv4 alike where the host allows:
    the server calls the address the agent's requests came from, whichever family that was.
    OSError when the port cannot be had."""
    try:
        return DualStackRpcHTTPServer(("::", port), rpc, reuse_address)
    except OSError:
        return RpcHTTPServer(("0.0.0.0", port), rpc, reuse_address)


class RpcServer:
    """The endpoint's state: the port it holds, the current TLS context, the server (bound
    from agent start on, serving once a certificate is installed), and the signatures
    accepted within the window (the replay cache)."""

    def __init__(self, agent, port, state_dir):
        self.agent = agent
        self.port = port  # the operator's --rpc-port, or None; once bound, the port held
        self.chosen_by_operator = port is not None
        self.cert_path = os.path.join(state_dir, RPC_CERT)
        self.key_path = os.path.join(state_dir, RPC_KEY)
        self.context = None
        self.httpd = None
        self.serving = False
        self.closed = False
        self.lock = threading.Lock()  # context, httpd, serving, closed
        self.seen = {}  # signature -> its timestamp
        self.seen_lock = threading.Lock()

    def take_port(self):
        """Hold the port (bound, not listening: callers are refused until a certificate
        arrives), so that the port the agent reports is the one it will serve on. False
        when no port could be had."""
        with self.lock:
            if self.httpd is None and not self.closed:
                self.httpd = self.bind()
            return self.httpd is not None

    def bind(self):
        """The operator's port is theirs: taken over connections of our own earlier run still
        in TIME_WAIT, and an error when another process holds it. The agent's own choice (the
        port its server knows, else DEFAULT_RPC_PORT) is bound exclusively, so that agents
        on one host never share it; when it is taken the OS picks a free port."""
        if self.chosen_by_operator:
            try:
                return bind_rpc_server(self, self.port, reuse_address=True)
            except OSError as exc:
                log("error", "cannot take the rpc port", port=self.port, error=exc)
                return None
        wanted = (self.agent.client.credentials or {}).get("rpc_port") or DEFAULT_RPC_PORT
        try:
            httpd = bind_rpc_server(self, wanted, reuse_address=False)
        except OSError as exc:
            try:
                httpd = bind_rpc_server(self, 0, reuse_address=False)
            except OSError as again:
                log("error", "cannot take any rpc port; going on without it", error=again)
                return None
            log(
                "warn",
                "rpc port taken; using a port the OS chose (--rpc-port N to choose one)",
                wanted=wanted,
                port=httpd.server_port,
                error=exc,
            )
        self.port = httpd.server_port
        return httpd

    def start(self):
        """At agent start: hold the port, and serve at once if a certificate was installed
        before."""
        if not self.take_port():
            return
        if not (os.path.exists(self.cert_path) and os.path.exists(self.key_path)):
            log("info", "rpc endpoint waits for its certificate", port=self.port)
            return
        try:
            context = rpc_context(self.cert_path, self.key_path)
        except (OSError, ValueError) as exc:
            log("error", "cannot load the rpc certificate; waiting for a new one", error=exc)
            return
        self.install(context)

    def install(self, context):
        """New connections get `context` from now on; start serving if nothing serves yet."""
        with self.lock:
            self.context = context
            if self.httpd is None and not self.closed:
                self.httpd = self.bind()
            if self.httpd is not None and not self.serving:
                self.serve()

    def serve(self):
        """Listen and accept on a thread of its own (self.lock held)."""
        try:
            self.httpd.server_activate()
        except OSError as exc:  # another process bound the operator's port as well, and won
            log("error", "cannot listen for rpc; going on without it", port=self.port, error=exc)
            self.httpd.server_close()
            self.httpd = None
            return
        thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": RPC_POLL_INTERVAL},
            name="rpc",
            daemon=True,
        )
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # see Agent
        try:
            thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.serving = True
        log("info", "rpc endpoint listening", port=self.port)

    def close(self):
        with self.lock:
            self.closed = True
            httpd, self.httpd = self.httpd, None
            serving, self.serving = self.serving, False
        if httpd is not None:
            if serving:
                httpd.shutdown()  # waits for serve_forever, which must have started
            httpd.server_close()

    def check(self, method, path, headers, body):
        """Why the request is refused, or None. Our clock is the one the agent signs with: if
        the server told us ours is off, its timestamps are judged by its own time."""
        creds = self.agent.client.credentials or {}
        timestamp = headers.get("X-Tether-Timestamp")
        signature = headers.get("X-Tether-Signature")
        if not creds.get("secret_key"):
            return "not registered"
        if not timestamp or not signature:
            return "unsigned"
        if not DIGITS.fullmatch(timestamp):
            return "malformed timestamp"
        now = time.time() + self.agent.client.clock_offset
        if abs(now - int(timestamp)) > RPC_WINDOW:
            return "timestamp outside the window"
        nonce = headers.get("X-Tether-Nonce") or ""
        if nonce and not NONCE.fullmatch(nonce):
            return "malformed nonce"
        expected = request_signature(creds["secret_key"], method, path, timestamp, body, nonce)
        given = signature.encode("latin-1", "replace")
        if not hmac.compare_digest(expected.encode("ascii"), given):
            return "signature does not match"
        with self.seen_lock:
            for old in [sig for sig, ts in self.seen.items() if now - ts > RPC_WINDOW]:
                del self.seen[old]  # outside the window: the timestamp check refuses it now
            if signature in self.seen:
                return "replayed"
            if len(self.seen) >= RPC_REPLAY_MAX:
                return "too many requests within the window"
            self.seen[signature] = int(timestamp)
        return None

    def answer(self, method, path):
        if (method, path) == ("GET", "/status"):
            return 200, self.status()
        if (method, path) == ("POST", "/wake"):
            log("info", "woken by the server; polling now")
            self.agent.woken.set()
            return 202, {}
        message = "no such call: %s %s" % (method, path)
        return 404, {"error": {"code": "not_found", "message": message}}

    def status(self):
        agent = self.agent
        with agent.journal.lock:
            runs = list(agent.journal.active.values())
        running = [r.entry.get("spec", {}).get("id", r.id) for r in runs if r.state == "started"]
        try:
            load = list(os.getloadavg())
        except OSError:
            load = None
        return {
            "agent_id": (agent.client.credentials or {}).get("agent_id"),
            "version": __version__,
            "uptime": round(time.monotonic() - agent.started_mono, 3),
            "running": running,
            "load": load,
        }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stop_signals_unblocked():
    """Helper threads block SIGTERM/SIGINT so that the kernel delivers them to the main thread,
    where they interrupt the long poll. A child inherits its spawning thread's signal mask, so a
    worker unblocks them just while it starts a command, or the command could not be stopped."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


class Agent:
    """What the sections share: arguments, server config, client, journal, runner, sender."""

    def __init__(self, args, client, journal):
        self.args = args
        self.client = client
        self.journal = journal
        self.stopping = threading.Event()
        self.config = dict(DEFAULT_REMOTE_CONFIG)
        self.config_known = False
        self.boot_id = read_boot_id()
        self.started_mono = time.monotonic()
        self.in_blocking_call = False
        self.polled_ok = False
        self.pending_upgrade = None  # the marker of an upgrade not yet confirmed
        self.woken = threading.Event()  # POST /wake, or a stop: end the wait between polls
        self.runner = Runner(self)
        self.sender = Sender(self)
        self.rpc = RpcServer(self, args.rpc_port, args.state_dir) if args.rpc_port != 0 else None

    def rpc_port(self):
        """The port to tell the server: the one the RPC endpoint holds, 0 for none."""
        rpc = self.rpc
        return rpc.port if rpc is not None and rpc.httpd is not None else 0

    def adopt_config(self, config):
        if isinstance(config, dict):
            merged = dict(DEFAULT_REMOTE_CONFIG)
            merged.update(config)
            self.config = merged
            self.config_known = True
            if "verify_ssl" in config:
                self.client.set_verify_ssl(config["verify_ssl"])

    def idle(self, seconds):
        """The main thread's wait between polls: a stop or a wake from the server ends it."""
        self.woken.wait(seconds)

    def blocking_call(self, func, *args, **kwargs):
        """Run a network call that a stop signal may abort (the main thread only)."""
        self.in_blocking_call = True
        try:
            return func(*args, **kwargs)
        finally:
            self.in_blocking_call = False

    def on_signal(self, signum, frame):
        if not self.stopping.is_set():
            log("info", "stop requested", signal=signal.Signals(signum).name)
        self.stopping.set()
        self.woken.set()
        if self.in_blocking_call:
            self.in_blocking_call = False
            raise Shutdown()

    def start_threads(self):
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.sender.start()
            self.runner.start()
            if self.rpc is not None:
                self.rpc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def shutdown(self):
        """Kill what runs (the workers see `stopping`), report it, and flush for a while."""
        self.stopping.set()
        if self.rpc is not None:
            self.rpc.close()
        self.runner.stop(self.args.kill_grace + 3.0)
        deadline = time.monotonic() + SHUTDOWN_FLUSH
        while self.sender.unsent_results() and time.monotonic() < deadline:
            self.sender.wake()
            time.sleep(0.05)
        left = self.sender.unsent_results()
        if left:
            log("warn", "stopping with unsent results; they are sent after the restart", count=left)
        log("info", "agent stopped")


def self_test():
    """What an upgrade runs on a new copy of this file before swapping it in: the journal
    and spool on disk, a signature, and a command in its own session with its output read
    back. Exit status 0 means the file can take over from the running agent."""
    import shutil
    import tempfile

    state_dir = tempfile.mkdtemp(prefix="tether-agent-self-test-")
    try:
        journal = Journal(state_dir)
        entry = {"id": "self-test", "spec": {"id": "self-test"}, "state": "accepted"}
        journal.save(entry, durable=True)
        if journal.load("self-test") != entry:
            raise RuntimeError("the journal does not read back what it wrote")
        client = Client("http://127.0.0.1:9")
        client.credentials = {"token": "0" * 32, "secret_key": "0" * 64}
        if len(client.sign("GET", "/", b"")["X-Tether-Signature"]) != 64:
            raise RuntimeError("signing is broken")
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # what the RPC endpoint serves with
        proc = subprocess.Popen(
            ["bash", "-c", "echo self-test"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        out, _ = proc.communicate(timeout=10)
        if proc.returncode != 0 or out != b"self-test\n":
            raise RuntimeError("cannot run a command: exit %s" % proc.returncode)
    except Exception as exc:
        log("error", "self-test failed", error=repr(exc))
        return 1
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    print("self-test ok, version %s" % __version__)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.self_test:
        return self_test()
    try:
        os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
        journal = Journal(args.state_dir)
    except OSError as exc:
        log("error", "cannot use the state dir", state_dir=args.state_dir, error=exc)
        return 2
    creds = load_credentials(args.state_dir)
    server = args.server or (creds or {}).get("server")
    if creds and creds.get("machine_id") and args.server_token:
        machine_id, _ = machine_identity(args.state_dir)
        if machine_id != creds["machine_id"]:
            # This state dir was copied to another host (or moved): its credentials belong
            # to the agent it came from; this host registers as itself.
            log("warn", "the state dir comes from another machine; registering as this one")
            creds = None
    if not server:
        log("error", "no server URL: pass --server or set TETHER_SERVER")
        return 2
    if not creds and not args.server_token:
        log("error", "no credentials and no --server-token", state_dir=args.state_dir)
        return 2
    if args.ca_file:
        try:
            ssl.create_default_context(cafile=args.ca_file)
        except (OSError, ValueError) as exc:
            log("error", "cannot load --ca-file", ca_file=args.ca_file, error=exc)
            return 2
    client = Client(server, args.ca_file, args.state_dir)
    agent = Agent(args, client, journal)
    for signum in STOP_SIGNALS:
        signal.signal(signum, agent.on_signal)
    log("info", "agent starting", version=__version__, server=server, state_dir=args.state_dir)
    try:
        if creds:
            client.credentials = creds
            if creds.get("server") != client.server_url:
                creds["server"] = client.server_url
                save_credentials(args.state_dir, creds)
            log("info", "using stored credentials", agent_id=creds.get("agent_id"))
        if agent.rpc is not None and not agent.rpc.take_port() and agent.rpc.chosen_by_operator:
            log("error", "--rpc-port is taken; choose another, or run with --no-rpc")
            return 2
        if not creds and not register(agent):
            return 0
        agent.start_threads()
        agent.runner.recover()
        check_upgrade_marker(agent)
        poll_forever(agent)
    except Shutdown:
        pass
    agent.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
