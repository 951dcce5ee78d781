"""HTTP bounded before any of Tether's code sees a request: uvicorn's h11 protocol with the
limits a server on a network needs (docs/security.md, "HTTP limits").

- A request head (request line and headers) is at most HTTP_MAX_HEAD_BYTES: h11 refuses a
  longer one while it arrives (431; 414 when the request line alone is too long), so a
  128 MiB header costs one buffer of that size, not a stall. At most HTTP_MAX_HEADERS fields
  (431), a target of at most HTTP_MAX_REQUEST_LINE bytes (414).
- Slow clients: a head must be in within HTTP_HEAD_TIMEOUT seconds of the connection (or of
  the previous answer on it), a body within HTTP_BODY_TIMEOUT seconds plus one second per
  HTTP_BODY_MIN_RATE bytes; else 408. A request read in full is never timed here: held
  long-polls and live streams answer when they answer.
- Closing a socket with unread data sends a reset, which a client still sending its body
  gets before it reads the refusal (a 413, say). So a connection closed while the client may
  still be sending is half-closed and what still arrives is dropped, for LINGER_SECONDS at
  most, before it closes (what nginx and Apache call a lingering close).

Refusals are JSON in the shape of tether.errors. httptools (uvicorn's default parser) has no
limit on a header's size or count; h11 costs about 50 µs more CPU per request (measured).
"""

import asyncio
import http
import json
from typing import Any

import h11
from django.conf import settings
from uvicorn.protocols.http.h11_impl import H11Protocol

from tether.errors import error_body

LINGER_SECONDS = 10.0


class _BoundedConnection(h11.Connection):
    """h11's connection (which bounds the head's bytes) bounding its fields and target too,
    and keeping why it refused a request for the answer."""

    refusal: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                if len(event.target) > settings.HTTP_MAX_REQUEST_LINE:
                    limit = settings.HTTP_MAX_REQUEST_LINE
                    raise h11.RemoteProtocolError(
                        f"request target is longer than {limit} bytes", error_status_hint=414
                    )
                if len(event.headers) > settings.HTTP_MAX_HEADERS:
                    raise h11.RemoteProtocolError(
                        f"more than {settings.HTTP_MAX_HEADERS} header fields",
                        error_status_hint=431,
                    )
            return event
        except h11.RemoteProtocolError as exc:
            self.refusal = exc
            raise


class _Transport:
    """The socket as uvicorn's protocol and request cycles see it: closing it goes through
    the protocol, which lingers when the client may still be sending."""

    def __init__(self, transport: asyncio.Transport, protocol: "BoundedH11Protocol") -> None:
        self.real = transport
        self.protocol = protocol
        self.closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def is_closing(self) -> bool:
        return self.closing or self.real.is_closing()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.protocol.close_when_read()


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with Tether's limits (module docstring)."""

    transport: _Transport  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _BoundedConnection(
            h11.SERVER, max_incomplete_event_size=settings.HTTP_MAX_HEAD_BYTES
        )
        self.head_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.body_started = 0.0
        self.body_received = 0
        self.lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        self._arm_timers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the rest of what was refused: dropped
        if self.conn.their_state is h11.SEND_BODY:
            self.body_received += len(data)
        super().data_received(data)
        self._arm_timers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_timers()

    # Slow clients ------------------------------------------------------------------------

    def _arm_timers(self) -> None:
        """A head timer runs while a head is awaited, a body timer while a body is; nothing
        runs once a request is in."""
        if self.lingering or self.transport.is_closing():
            self._cancel_timers()
            return
        state = self.conn.their_state
        if state is h11.IDLE and self.head_timer is None:
            self.head_timer = self.loop.call_later(settings.HTTP_HEAD_TIMEOUT, self._head_late)
        elif state is not h11.IDLE and self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if state is h11.SEND_BODY and self.body_timer is None:
            self.body_started, self.body_received = self.loop.time(), 0
            self.body_timer = self.loop.call_later(settings.HTTP_BODY_TIMEOUT, self._body_late)
        elif state is not h11.SEND_BODY and self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _cancel_timers(self) -> None:
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = None

    def _head_late(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            timeout = settings.HTTP_HEAD_TIMEOUT
            self._refuse(408, "timeout", f"request head not received within {timeout:g} s")
        else:  # a connection that never asked anything: nothing to answer
            self.transport.close()

    def _body_late(self) -> None:
        self.body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        due = (
            self.body_started
            + settings.HTTP_BODY_TIMEOUT
            + self.body_received / max(1, settings.HTTP_BODY_MIN_RATE)
        )
        if self.loop.time() < due:  # still arriving fast enough
            self.body_timer = self.loop.call_at(due, self._body_late)
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()
            return
        if cycle is not None:  # the application reading the body sees a disconnect
            cycle.disconnected = True
            cycle.message_event.set()
        rate = settings.HTTP_BODY_MIN_RATE
        self._refuse(408, "timeout", f"request body arrived slower than {rate} bytes/s")

    # Refusals and closing ----------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this when h11 refuses a request: answer why, in JSON."""
        refusal = self.conn.refusal
        status = getattr(refusal, "error_status_hint", 400)
        if status == 431 and str(refusal) == "Receive buffer too long":
            # The head outgrew its buffer; name the request line when it alone did.
            head = self.conn.trailing_data[0][: settings.HTTP_MAX_REQUEST_LINE + 2]
            if b"\r\n" not in head and b"\n" not in head:
                line = settings.HTTP_MAX_REQUEST_LINE
                status, message = 414, f"request line is longer than {line} bytes"
            else:
                message = f"request head is larger than {settings.HTTP_MAX_HEAD_BYTES} bytes"
        elif status in (414, 431):
            message = str(refusal)
        else:
            status, message = 400, f"malformed HTTP request: {refusal or msg}"
        code = {400: "bad_request", 414: "uri_too_long", 431: "headers_too_large"}[status]
        self._refuse(status, code, message)

    def _refuse(self, status: int, code: str, message: str) -> None:
        body = json.dumps(error_body(code, message)).encode()
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()

    def close_when_read(self) -> None:
        """Close now when the client has sent all it meant to; else half-close, drop what
        still arrives and close when the client does, or after LINGER_SECONDS."""
        self._cancel_timers()
        real = self.transport.real
        request_in = self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)
        idle = self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]
        if request_in or idle or real.is_closing():
            real.close()
            return
        self.lingering = True
        if real.can_write_eof():
            real.write_eof()  # after what was written: the client reads the answer, then EOF
        real.resume_reading()
        self.loop.call_later(LINGER_SECONDS, real.close)
