"""The one error type of tetherctl: whatever stops a command before it has an answer (bad
usage, no login, a refused token, an unreachable server, an API error) is a `CliError`, shown
as one line on stderr with exit status 2 (`main.main`), never as a traceback."""

USAGE_OR_API_ERROR = 2
INTERRUPTED = 130


class CliError(Exception):
    """A refusal to show the operator as one line; `status` and `code` are the API's, when
    the API refused."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def __str__(self) -> str:
        return self.message


class ConnectionFailed(CliError):
    """The server could not be reached or did not answer: nothing is known of the request's
    fate, so a retry is safe only with an idempotency key."""
