"""HTTP bounded before any of Tether's code sees a request: uvicorn's httptools protocol with
the limits a server on a network needs (docs/security.md, "HTTP limits").

- A request head (request line and headers) is at most HTTP_MAX_HEAD_BYTES: fed to the parser
  no further than that, it is refused there (431), so a 128 MiB header costs one buffer, not
  a stall. At most HTTP_MAX_HEADERS fields (431), a target of at most HTTP_MAX_REQUEST_LINE
  bytes (414). (A request pipelined behind another in one read is counted from its first
  read of its own: its head may be one read, 256 KiB, larger.)
- Slow clients: a head must be in within HTTP_HEAD_TIMEOUT seconds of the connection (or of
  the previous answer on it), a body within HTTP_BODY_TIMEOUT seconds plus one second per
  HTTP_BODY_MIN_RATE bytes; else 408. A request read in full is never timed here: held
  long-polls and live streams answer when they answer.
- Closing a socket with unread data sends a reset, which a client still sending its body
  gets before it reads the refusal (a 413, say). So a connection closed while the client may
  still be sending is half-closed and what still arrives is dropped, for LINGER_SECONDS at
  most, before it closes (what nginx and Apache call a lingering close).

Refusals are JSON in the shape of tether.errors. httptools (llhttp), uvicorn's fastest parser,
has no limit of its own; h11, which bounds the head's size, was measured at 0.37-0.39 ms of
server CPU per poll against 0.18-0.29 ms for httptools with or without these limits.
"""

import asyncio
import http
import json
from typing import Any

from django.conf import settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tether.errors import error_body

LINGER_SECONDS = 10.0


class _Refused(Exception):
    """Raised in a parser callback: the request is refused with this status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Transport:
    """The socket as uvicorn's protocol and request cycles see it: closing it goes through
    the protocol, which lingers when the client may still be sending."""

    def __init__(self, transport: asyncio.Transport, protocol: "BoundedHttpToolsProtocol") -> None:
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


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with Tether's limits (module docstring)."""

    transport: _Transport  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reading_head = True  # until the head is in; again once the message is
        self.reading_body = False
        self.head_bytes = 0
        self.fields = 0
        self.refusal: _Refused | None = None
        self.head_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.body_started = 0.0
        self.body_received = 0
        self.lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while data and not self.lingering and not self.transport.is_closing():
            if self.reading_head:
                room = settings.HTTP_MAX_HEAD_BYTES - self.head_bytes
                if room <= 0:
                    limit = settings.HTTP_MAX_HEAD_BYTES
                    message = f"request head is larger than {limit} bytes"
                    self._refuse(431, "headers_too_large", message)
                    return
                piece, data = data[:room], data[room:]
                self.head_bytes += len(piece)
            else:
                piece, data = data, b""
                self.body_received += len(piece)
            super().data_received(piece)
        if self.reading_body and self.body_timer is None and not self.transport.is_closing():
            self.body_started, self.body_received = self.loop.time(), 0
            self.body_timer = self.loop.call_later(settings.HTTP_BODY_TIMEOUT, self._body_late)

    # Parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.fields = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > settings.HTTP_MAX_REQUEST_LINE:
            message = f"request target is longer than {settings.HTTP_MAX_REQUEST_LINE} bytes"
            self.refusal = _Refused(414, "uri_too_long", message)
            raise self.refusal

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += 1
        if self.fields > settings.HTTP_MAX_HEADERS:
            message = f"more than {settings.HTTP_MAX_HEADERS} header fields"
            self.refusal = _Refused(431, "headers_too_large", message)
            raise self.refusal
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.reading_head, self.reading_body = False, True
        self._cancel_timers()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.reading_head, self.reading_body, self.head_bytes = True, False, 0
        self._cancel_timers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    # Slow clients ------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self.head_timer is None and not self.transport.is_closing():
            self.head_timer = self.loop.call_later(settings.HTTP_HEAD_TIMEOUT, self._head_late)

    def _cancel_timers(self) -> None:
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = None

    def _head_late(self) -> None:
        self.head_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if self.transport.is_closing() or not self.reading_head or busy:
            return
        if self.head_bytes:
            timeout = settings.HTTP_HEAD_TIMEOUT
            self._refuse(408, "timeout", f"request head not received within {timeout:g} s")
        else:  # a connection that never asked anything: nothing to answer
            self.transport.close()

    def _body_late(self) -> None:
        self.body_timer = None
        if self.transport.is_closing() or not self.reading_body:
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
        if cycle.response_started:
            self.transport.close()
            return
        cycle.disconnected = True  # the application reading the body sees a disconnect
        cycle.message_event.set()
        rate = settings.HTTP_BODY_MIN_RATE
        self._refuse(408, "timeout", f"request body arrived slower than {rate} bytes/s")

    # Refusals and closing ----------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this when the parser fails, a callback's refusal included."""
        refusal, self.refusal = self.refusal, None
        if refusal is None:
            refusal = _Refused(400, "bad_request", f"malformed HTTP request: {msg}")
        self._refuse(refusal.status, refusal.code, refusal.message)

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
        if not (self.reading_body or self.head_bytes) or real.is_closing():
            real.close()
            return
        self.lingering = True
        if real.can_write_eof():
            real.write_eof()  # after what was written: the client reads the answer, then EOF
        real.resume_reading()
        self.loop.call_later(LINGER_SECONDS, real.close)
