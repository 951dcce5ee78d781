"""Events that travel up the layers, by name, in one place.

The apps are layered (docs/architecture.md): `accounts` <- `fleet` <- `commands` <- `pki` <-
`deploy` <- `web`, each importing only those below it. Sometimes a lower app must let a higher
one act: a command's result ends a deployment, a registration needs a certificate. The lower
app declares a `Hook` in its own `hooks.py` and calls it; the higher app connects its handler
in its `AppConfig.ready()`. Unlike Django signals, a hook is declared where it fires, called
synchronously (inside the caller's transaction when it has one), and has a fixed list of
handlers that the app registry fills once at start (in INSTALLED_APPS order).
"""

from collections.abc import Callable
from typing import Any

Handler = Callable[..., Any]


class Hook:
    """One upward event: the app that fires it does not know who listens."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.handlers: list[Handler] = []

    def connect(self, handler: Handler) -> Handler:
        """Add `handler` (once: AppConfig.ready() may run twice in some test setups)."""
        if handler not in self.handlers:
            self.handlers.append(handler)
        return handler

    def send(self, **event: Any) -> None:
        """Call every handler with the event's keyword arguments, in the caller's transaction
        if any; an exception propagates (and rolls that transaction back with it)."""
        for handler in self.handlers:
            handler(**event)

    def collect(self, **event: Any) -> list[Any]:
        """Every handler's answer, in order (contributions to something the caller builds)."""
        return [handler(**event) for handler in self.handlers]

    def first(self, **event: Any) -> Any:
        """Ask the handlers in turn; the first answer that is not None wins (a question only a
        higher app can answer, such as a token it issued)."""
        for handler in self.handlers:
            answer = handler(**event)
            if answer is not None:
                return answer
        return None

    def __repr__(self) -> str:
        return f"<Hook {self.name}: {len(self.handlers)} handler(s)>"
