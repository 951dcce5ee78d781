#!/usr/bin/env python3
"""Simulated agents for the benches: thousands per process, asyncio and the standard library
only, speaking the agent protocol (docs/agent-protocol.md) on one keep-alive connection each.

A real agent is a process of its own (about 28 MiB); a fleet of 10,000 of them does not fit
beside the server on a 2-core machine, and the server cannot tell the difference: it sees the
same requests on the same kind of connections. Each simulated agent speaks one of the two
dialects:
  signed   Tether's own (agent/main.py): registers declaring `signing`, signs every request
           (HMAC over method, path, timestamp and body hash), polls `poll_commands/`, reports
           output with byte offsets and a result with sizes.
  legacy   the original system's: bearer token only, polls `poll/`, reports progress without
           offsets and a final result that carries the whole output (`append: false`).
Both hold a 25 s long-poll. The first poll of each agent asks for a random wait below that,
so the fleet's polls come back spread over the window instead of all at once.

What a simulated agent "runs": a command whose line is `bench-output SIZE CHUNK` prints SIZE
bytes (`output_for`) in CHUNK-sized progress calls, then reports its result; anything else
ends at once with exit code 0 and no output, as `true` would, reporting the moment the poll
answered as its `started_at` (how the benches time delivery).

A simulating process is started by `SimulatorProcess` (the parent side, below); it registers
its agents and prints one JSON line with their ids; a `live` line on its stdin then starts
their polls (so that registering a large fleet is not slowed by the polls of the agents
already registered), and a `stats` line asks for a JSON line of its counters; it ends when
its stdin closes.
"""

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

LONG_POLL = 25
OUTPUT_COMMAND = "bench-output"
SIGNED, LEGACY = "signed", "legacy"

# ---------------------------------------------------------------------------------------------
# HTTP: one keep-alive connection per agent
# ---------------------------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection: a request at a time, reconnecting when closed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        for attempt in (1, 2):
            try:
                return await self._exchange(method, path, headers, body)
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("closed by the server")
        answer: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            answer[name.strip().lower()] = value.strip()
        if answer.get("transfer-encoding") == "chunked":
            parts = []
            while size := int((await self.reader.readline()).strip(), 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readline()
            await self.reader.readline()
            payload = b"".join(parts)
        else:
            payload = await self.reader.readexactly(int(answer.get("content-length", 0)))
        if answer.get("connection", "").lower() == "close":
            self.close()
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


# ---------------------------------------------------------------------------------------------
# The agents
# ---------------------------------------------------------------------------------------------


def output_for(command_id: int, size: int) -> bytes:
    """What `bench-output SIZE` prints for this command: numbered lines that name the command,
    so a chunk lost, stored twice or stored in the wrong place changes the hash."""
    lines = (size + 63) // 64
    fill = b"." * 41
    return b"".join(b"%010d %010d %s\n" % (command_id, n, fill) for n in range(lines))[:size]


@dataclass
class Stats:
    """One simulating process's counters (the parent reads them with `stats`)."""

    agents: int = 0
    polls: int = 0  # answered 200
    commands: int = 0
    progress_calls: int = 0
    results: int = 0
    output_bytes: int = 0  # bytes of output handed to the server (first copy only)
    errors: int = 0
    last_errors: list[str] = field(default_factory=list)
    # Each progress call's round trip as this agent saw it (ms): the server's time for the
    # call, plus any wait for the server's CPU behind the calls of the other agents.
    progress_ms: list[float] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        self.last_errors = [*self.last_errors[-4:], what[:200]]


@dataclass
class SimulatedAgent:
    agent_id: int
    token: str
    secret: str | None  # None: the older dialect, which does not sign
    connection: Connection
    stats: Stats
    round_trip: float = 0.0  # the last call's, in s: request written -> answer read

    @property
    def dialect(self) -> str:
        return LEGACY if self.secret is None else SIGNED

    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        """The older dialect's bearer token; Tether's adds agent/main.py's request_signature."""
        headers = {"X-Agent-Token": self.token, "Accept": "application/json"}
        if self.secret is not None:
            timestamp, nonce = str(int(time.time())), os.urandom(16).hex()
            digest = hashlib.sha256(body).hexdigest()
            message = "\n".join([method, path, timestamp, nonce, digest])
            key = self.secret.encode("ascii")
            headers["X-Tether-Timestamp"] = timestamp
            headers["X-Tether-Nonce"] = nonce
            headers["X-Tether-Signature"] = hmac.new(
                key, message.encode(), hashlib.sha256
            ).hexdigest()
        if body:
            headers["Content-Type"] = "application/json"
        return headers

    async def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        headers = self.headers(method, path, body)
        began = time.perf_counter()
        status, raw = await self.connection.request(method, path, headers, body)
        self.round_trip = time.perf_counter() - began
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw[:200]

    def command_path(self, command_id: int, kind: str) -> str:
        prefix = "commands" if self.secret is None else "command"
        return f"/api/agents/{prefix}/{command_id}/{kind}/"

    async def live(self) -> None:
        """Poll, "run" what comes, report it, poll again; back off a second on a failure."""
        poll = "poll" if self.secret is None else "poll_commands"
        wait = random.uniform(1, LONG_POLL)
        while True:
            try:
                status, answer = await self.call("GET", f"/api/agents/{poll}/?wait={wait:.0f}")
            except OSError as exc:
                self.stats.error(f"poll: {exc!r}")
                await asyncio.sleep(1)
                continue
            wait = LONG_POLL
            if status != 200:
                self.stats.error(f"poll: {status} {answer}")
                await asyncio.sleep(1)
                continue
            self.stats.polls += 1
            received = time.time()
            for spec in answer["commands"]:
                self.stats.commands += 1
                try:
                    await self.run(spec, received)
                except OSError as exc:
                    self.stats.error(f"report {spec['id']}: {exc!r}")

    async def run(self, spec: dict[str, Any], received: float) -> None:
        words = str(spec.get("command", "")).split()
        output, chunk = b"", 1
        if len(words) == 3 and words[0] == OUTPUT_COMMAND:
            output, chunk = output_for(spec["id"], int(words[1])), int(words[2])
        # As agent/main.py does, a 409 offset_gap (the server has fewer bytes than sent) makes
        # a signing agent send again from where the server is; a few times at most.
        offset = 0
        for _ in range(len(output) // chunk + 5):
            if offset < len(output):
                offset = await self.progress(spec["id"], output, offset, chunk, received)
            elif (resend := await self.result(spec["id"], output, received)) is None:
                return
            else:
                offset = resend
        self.stats.error(f"command {spec['id']}: gave up resending")

    async def progress(
        self, command_id: int, output: bytes, offset: int, chunk: int, started: float
    ) -> int:
        """Send one chunk; returns the offset to send from next."""
        text = output[offset : offset + chunk].decode()
        if self.secret is None:
            body: dict[str, Any] = {"stdout": text, "append": True}
        else:
            body = {"stdout": text, "offset_stdout": offset, "offset_stderr": 0}
            body.update(encoding="utf-8", started_at=started, append=True)
        status, answer = await self.call("POST", self.command_path(command_id, "progress"), body)
        self.stats.progress_ms.append(round(self.round_trip * 1000, 3))
        self.stats.progress_calls += 1
        if status == 200:
            self.stats.output_bytes += len(text)
            return offset + len(text)
        self.stats.error(f"progress {command_id}: {status} {answer}")
        return gap_offset(status, answer, fallback=offset + len(text))

    async def result(self, command_id: int, output: bytes, started: float) -> int | None:
        """Tether's result claims the sizes of what progress sent; the older dialect's carries
        the whole output again, which replaces what its progress appended. Returns the offset
        to send output from again when the server is missing some, else None."""
        now = time.time()
        body: dict[str, Any] = {"success": True, "started_at": started, "finished_at": now}
        if self.secret is None:
            body.update(return_code=0, stdout=output.decode(), stderr="", append=False)
        else:
            body.update(status="succeeded", exit_code=0, append=True)
            body.update(stdout_size=len(output), stderr_size=0)
        status, answer = await self.call("POST", self.command_path(command_id, "result"), body)
        if status == 200:
            self.stats.results += 1
            return None
        self.stats.error(f"result {command_id}: {status} {answer}")
        resend = gap_offset(status, answer, fallback=-1)
        return None if resend < 0 else resend


def gap_offset(status: int, answer: Any, fallback: int) -> int:
    """Where the server asks output to be sent from (409 offset_gap), else `fallback`."""
    error = answer.get("error") if isinstance(answer, dict) else None
    if status == 409 and isinstance(error, dict) and error.get("code") == "offset_gap":
        expected = error.get("expected")
        if isinstance(expected, dict) and isinstance(expected.get("stdout"), int):
            return expected["stdout"]
    return fallback


async def register(
    connection: Connection, server_token: str, hostname: str, signed: bool, stats: Stats
) -> SimulatedAgent:
    """Register as agent/main.py does (signed), or as the original system's agents do."""
    body: dict[str, Any] = {"server_token": server_token, "hostname": hostname, "os": "linux"}
    if signed:
        body.update(version="sim", arch="x86_64", signing="hmac-sha256")
        # One machine per simulated agent, as a real fleet has (agent/main.py machine_identity).
        body.update(machine_id=hashlib.sha256(hostname.encode()).hexdigest()[:32])
        body.update(instance_id=body["machine_id"])
    else:
        body["version"] = "legacy-sim"
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    for attempt in range(8):
        try:
            status, raw = await connection.request(
                "POST", "/api/agents/register/", headers, payload
            )
        except OSError as exc:
            stats.error(f"register: {exc!r}")
        else:
            if status == 201:
                answer = json.loads(raw)
                secret = answer["secret_key"] if signed else None
                agent_id, token = answer["agent_id"], answer["token"]
                return SimulatedAgent(agent_id, token, secret, connection, stats)
            stats.error(f"register: {status} {raw[:200]!r}")
            if status < 500 and status != 429:
                break
        await asyncio.sleep(min(0.2 * 2**attempt, 5))
    raise RuntimeError(f"{hostname} could not register: {stats.last_errors}")


async def simulate(
    url: str, server_token: str, count: int, prefix: str, signed_share: float, concurrency: int
) -> None:
    """Register `count` agents (`concurrency` at a time), announce them, then live."""
    host, port = endpoint(url)
    stats = Stats()
    signed_count = round(count * signed_share)
    gate = asyncio.Semaphore(concurrency)
    began = time.monotonic()

    async def one(n: int) -> SimulatedAgent:
        async with gate:
            connection = Connection(host, port)
            signed = n < signed_count
            return await register(connection, server_token, f"{prefix}-{n}", signed, stats)

    agents = await asyncio.gather(*(one(n) for n in range(count)))
    stats.agents = len(agents)
    took = time.monotonic() - began
    announce = {"agents": [[a.agent_id, a.dialect] for a in agents], "seconds": took}
    print(json.dumps(announce), flush=True)

    loop = asyncio.get_running_loop()
    live, closed = loop.create_future(), loop.create_future()

    def obey() -> None:
        """The parent's lines: `live` starts the polls, `stats` asks for the counters;
        stdin closing ends the process."""
        for line in sys.stdin:
            if line.strip() == "live":
                loop.call_soon_threadsafe(live.set_result, None)
            elif line.strip() == "stats":
                print(json.dumps(asdict(stats)), flush=True)
        loop.call_soon_threadsafe(closed.set_result, None)

    threading.Thread(target=obey, daemon=True).start()
    await asyncio.wait([live, closed], return_when=asyncio.FIRST_COMPLETED)
    lives = [asyncio.ensure_future(agent.live()) for agent in agents]
    await closed
    for task in lives:
        task.cancel()


# ---------------------------------------------------------------------------------------------
# The parent's side
# ---------------------------------------------------------------------------------------------


class SimulatorProcess:
    """One simulating child process, driven over its stdin and stdout."""

    def __init__(
        self,
        url: str,
        server_token: str,
        count: int,
        prefix: str,
        *,
        signed_share: float = 1.0,
        concurrency: int = 16,
        log: Path,
    ) -> None:
        argv = [sys.executable, __file__, "--server", url, "--server-token", server_token]
        argv += ["--count", str(count), "--prefix", prefix, "--signed-share", str(signed_share)]
        argv += ["--concurrency", str(concurrency)]
        self.log = log
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
            text=True,
            bufsize=1,
        )
        self.agents: list[tuple[int, str]] = []
        self.seconds = 0.0

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"simulator exited {self.proc.returncode}: {self.tail()}")
        return json.loads(line)

    def registered(self) -> list[tuple[int, str]]:
        """Block until the child has registered all its agents: their (id, dialect)."""
        announce = self._line()
        self.agents = [(agent_id, dialect) for agent_id, dialect in announce["agents"]]
        self.seconds = announce["seconds"]
        return self.agents

    def tell(self, line: str) -> None:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def live(self) -> None:
        """Start the registered agents' polls."""
        self.tell("live")

    def stats(self) -> dict[str, Any]:
        self.tell("stats")
        return self._line()

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-2000:]
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description="A process of simulated agents (see above).")
    parser.add_argument("--server", required=True)
    parser.add_argument("--server-token", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", required=True, help="hostnames are PREFIX-N")
    parser.add_argument("--signed-share", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=16, help="registrations at once")
    args = parser.parse_args()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(
        simulate(
            args.server,
            args.server_token,
            args.count,
            args.prefix,
            args.signed_share,
            args.concurrency,
        )
    )


if __name__ == "__main__":
    main()
