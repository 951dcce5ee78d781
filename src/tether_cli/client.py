"""HTTP to the Tether API with the standard library: JSON requests, paged lists, and
Server-Sent Events. Every failure becomes one `CliError` with a one-line message: the API's
`{"error": {"code", "message"}}` (DESIGN §7), or what kept the request from an answer."""

import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from .config import Login
from .errors import CliError, ConnectionFailed

USER_AGENT = "tetherctl/0.1"
REQUEST_TIMEOUT = 60.0
# The server sends a keepalive comment every 15 s on an idle stream; four missed ones mean
# the connection is gone.
STREAM_READ_TIMEOUT = 60.0

SUMMARIES = {
    400: "refused",
    401: "authentication failed",
    403: "permission denied",
    404: "not found",
    405: "method not allowed",
    409: "conflict",
    413: "too large",
    429: "throttled",
}


def describe_http_error(status: int, payload: bytes, retry_after: str | None = None) -> CliError:
    """One line for a refusal: `authentication failed (401): Invalid token.`; a throttled
    call says when to try again (its Retry-After header, from the API or a proxy)."""
    code, message = "", ""
    try:
        error = json.loads(payload or b"null")["error"]
        code, message = str(error.get("code", "")), str(error.get("message", ""))
    except (ValueError, TypeError, KeyError, AttributeError):
        pass  # not the API's JSON (a proxy's page): the status alone says what happened
    summary = SUMMARIES.get(status, "server error" if status >= 500 else "error")
    if status == 429 and retry_after and retry_after.strip().isdigit():
        message = f"try again in {int(retry_after)} s."
    text = f"{summary} ({status}): {message}" if message else f"{summary} ({status})"
    return CliError(text, status=status, code=code)


def describe_connection_error(url: str, exc: BaseException) -> ConnectionFailed:
    reason: Any = getattr(exc, "reason", None) or exc
    if isinstance(reason, TimeoutError | socket.timeout):
        return ConnectionFailed(f"no answer from {url} (timed out)")
    if isinstance(reason, OSError) and reason.strerror:
        reason = reason.strerror
    return ConnectionFailed(f"cannot connect to {url}: {reason}")


class RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """The API does not redirect; a redirect means the URL is not the API's own (http for
    https, a proxy's login page), and following it would carry the token elsewhere."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, hdrs: Any, newurl: str
    ) -> NoReturn:
        raise CliError(f"the server redirects to {newurl} ({code}): log in with the right URL")


OPENER = urllib.request.build_opener(RefuseRedirects())


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event, its data decoded from JSON."""

    name: str
    data: Any


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Events from an SSE stream's lines (the text/event-stream format: `event:` and `data:`
    fields, a blank line ends an event, `:` starts a comment such as a keepalive)."""
    name, data = "", []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload = json.loads(text)
                except ValueError:
                    payload = text
                yield Event(name or "message", payload)
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)


class Client:
    """The API at `login.url`, as the user whose token `login.token` is (no token: anonymous,
    for logging in)."""

    def __init__(self, login: Login, timeout: float = REQUEST_TIMEOUT) -> None:
        self.base = login.url.rstrip("/")
        self.token = login.token
        self.timeout = timeout

    def url(self, path: str, params: dict[str, Any] | None = None) -> str:
        if path.startswith(("http://", "https://")):
            return path
        query = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        suffix = "?" + urllib.parse.urlencode(query) if query else ""
        return self.base + path + suffix

    def _open(
        self,
        method: str,
        url: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> http.client.HTTPResponse:
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Accept": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
        if self.token:
            all_headers["Authorization"] = f"Token {self.token}"
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
        try:
            return OPENER.open(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            raise describe_http_error(exc.code, _read_quietly(exc), retry_after) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise describe_connection_error(self.base, exc) from None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """The decoded JSON answer of one call (None for an empty body)."""
        with self._open(method, self.url(path, params), body, headers) as response:
            try:
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise describe_connection_error(self.base, exc) from None
        try:
            return json.loads(payload) if payload else None
        except ValueError:
            raise CliError(f"unexpected answer from {self.base}: not JSON") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, {} if body is None else body, **kw)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def get_all(self, path: str, **params: Any) -> list[Any]:
        """Every item of a paged list (`{count, next, previous, results}`), following `next`;
        an unpaged list is returned as it is."""
        page = self.get(path, **params)
        if isinstance(page, list):
            return page
        items = list(page["results"])
        while page.get("next"):
            page = self.get(page["next"])
            items.extend(page["results"])
        return items

    def events(self, path: str) -> Iterator[Event]:
        """The events of an SSE stream until the server closes it. A dropped or silent
        connection raises `ConnectionFailed`."""
        url = self.url(path)
        headers = {"Accept": "text/event-stream"}
        with self._open("GET", url, headers=headers, timeout=STREAM_READ_TIMEOUT) as response:
            lines = (raw.decode("utf-8", "replace") for raw in response)
            try:
                yield from parse_sse(lines)
            except (OSError, http.client.HTTPException) as exc:
                raise describe_connection_error(self.base, exc) from None


def _read_quietly(response: urllib.error.HTTPError) -> bytes:
    """An error answer's body, or nothing when it cannot be read; the answer is closed."""
    try:
        return response.read()
    except (OSError, http.client.HTTPException):
        return b""
    finally:
        response.close()
