"""tetherctl's commands. Each parses its arguments, asks the API (`client`), and shows the
answer (`render`). Exit status: 0 done, 1 some target or agent did not succeed, 2 usage, login,
connection or API error (one line on stderr), 130 interrupted."""

import getpass
import os
import socket
import sys
from enum import StrEnum
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand

from . import render, runs, tokens
from .client import Client
from .config import Login, current_login, forget_login, normalize_url, save_login, stored_login
from .errors import INTERRUPTED, USAGE_OR_API_ERROR, CliError
from .targets import parse_targets, resolve_agents, resolve_one

app = typer.Typer(
    name="tetherctl",
    help="Drive a Tether fleet from the terminal, over the REST API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.add_typer(tokens.app, name="tokens")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class Offline(StrEnum):
    skip = "skip"
    wait = "wait"


class CommandAfterDashes(TyperCommand):
    """`run TARGET... -- COMMAND`: the words after the first `--` are the command, kept
    whole (options included) instead of being parsed as tetherctl's."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if "--" in args:
            at = args.index("--")
            ctx.meta["command_words"] = args[at + 1 :]
            args = args[:at]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [*super().collect_usage_pieces(ctx), "[-- COMMAND]"]


def main() -> None:
    """The `tetherctl` console script: a `CliError` is one line on stderr and exit 2."""
    try:
        app()
    except CliError as exc:
        render.error(str(exc))
        sys.exit(USAGE_OR_API_ERROR)


def client() -> Client:
    return Client(current_login())


@app.command()
def login(
    url: Annotated[str, typer.Argument(help="The server, e.g. https://tether.example.com")],
    username: Annotated[str, typer.Option(help="Asked for when not given.")] = "",
) -> None:
    """Log in to a Tether server and store its URL and a new API token.

    The token is named tetherctl@HOSTNAME and expires when the server's default says. The
    password comes from TETHER_PASSWORD, or is asked for without echo.
    """
    url = normalize_url(url)
    try:
        username = username or input("Username: ").strip()
        password = os.environ.get("TETHER_PASSWORD") or getpass.getpass("Password: ")
    except EOFError:
        raise CliError(
            "no username or password given (use --username and TETHER_PASSWORD)"
        ) from None
    try:
        answer = Client(Login(url=url, token="")).post(
            "/api/auth/token/",
            {"username": username, "password": password, "name": login_token_name()},
        )
    except CliError as exc:
        raise CliError(f"login failed: {exc}", status=exc.status, code=exc.code) from None
    path = save_login(Login(url=url, token=answer["token"], token_id=str(answer["id"])))
    render.note(f"logged in to {url} as {username}; login stored in {path}")
    overriding = [name for name in ("TETHER_URL", "TETHER_TOKEN") if os.environ.get(name)]
    if overriding:
        render.note(f"{' and '.join(overriding)} in the environment still override it")


@app.command()
def logout() -> None:
    """Revoke the stored login's API token on its server, then forget the login.

    A token given in TETHER_TOKEN is not touched (`tetherctl tokens revoke ID` does that). When
    the server cannot be reached the login is kept, so that logout can be tried again.
    """
    stored = stored_login()
    if not stored.get("url") or not stored.get("token"):
        render.note("not logged in: nothing to do")
        return
    login = Login(url=normalize_url(stored["url"]), token=stored["token"])
    api = Client(login)
    try:
        token_id = stored.get("token_id") or _token_id(api, login.token)
        api.delete(f"/api/auth/tokens/{token_id}/")
        done = f"token {token_id} revoked"
    except CliError as exc:
        if exc.status not in (401, 404):  # 401/404: the token no longer works already
            raise CliError(f"logout failed, login kept: {exc}", status=exc.status) from None
        done = "the token no longer worked"
    forget_login()
    render.note(f"logged out of {login.url}: {done}")


def _token_id(api: Client, token: str) -> str:
    """The id of `token` among its owner's tokens, by the prefix the server lists."""
    found = [item for item in api.get_all("/api/auth/tokens/") if token.startswith(item["prefix"])]
    if not found:  # revoked or expired: not listed
        raise CliError("the token is not among yours", status=404)
    if len(found) > 1:
        raise CliError("cannot tell which of your tokens this login uses")
    return str(found[0]["id"])


def login_token_name() -> str:
    """How the token a login makes is listed (`tetherctl tokens`, the tokens page): which
    machine holds it, so that a lost laptop's token is the one to revoke."""
    return f"tetherctl@{socket.gethostname()}"[:100]


@app.command()
def agents(
    status: Annotated[str, typer.Option(help="online, offline, pending, stopped, upgrading")] = "",
    tag: Annotated[str, typer.Option(help="Only agents with this tag.")] = "",
    as_json: JsonOption = False,
) -> None:
    """List your agents."""
    found = client().get_all("/api/agents/", status=status, tag=tag)
    if as_json:
        render.print_json(found)
    else:
        render.agents_table(found)


@app.command(cls=CommandAfterDashes, no_args_is_help=True)
def run(
    ctx: typer.Context,
    targets: Annotated[
        list[str],
        typer.Argument(metavar="TARGET", help="hostname, agent id, tag:NAME, server:ID, all"),
    ],
    timeout: Annotated[int | None, typer.Option(help="Seconds per target.")] = None,
    max_concurrency: Annotated[
        str | None, typer.Option(help='Targets running at once: a number or "20%".')
    ] = None,
    max_errors: Annotated[
        str | None, typer.Option(help='Past this many failures ("10%" too), stop starting.')
    ] = None,
    offline: Annotated[
        Offline, typer.Option(help="Offline targets: skip them, or wait for them.")
    ] = Offline.skip,
    template: Annotated[str | None, typer.Option(help="A command template (id or name).")] = None,
    param: Annotated[list[str] | None, typer.Option(help="A template value, NAME=VALUE.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="No live output: one JSON document.")
    ] = False,
) -> None:
    """Run a command on many agents: tetherctl run TARGET... -- COMMAND.

    The words after -- are one command line, run with bash -c on each target. Exit status 0
    when every target succeeded, 1 when any did not.
    """
    words = ctx.meta.get("command_words")
    if template is not None and words:
        raise CliError("give either a command after `--` or --template, not both")
    if template is None and param:
        raise CliError("--param goes with --template")
    body: dict[str, Any] = {"targets": parse_targets(targets).as_body()}
    if template is None:
        body.update(runs.command_fields(words or []))
    limits = {
        "timeout": timeout,
        "max_concurrency": runs.parse_limit(max_concurrency, "--max-concurrency"),
        "max_errors": runs.parse_limit(max_errors, "--max-errors"),
    }
    body.update({name: value for name, value in limits.items() if value is not None})
    body["offline"] = offline.value
    api = client()
    if template is not None:
        body.update(runs.template_fields(api, template, param or []))

    run_id = None
    try:
        started = runs.start_run(api, body)
        run_id = started["id"]
        labels = runs.labels_for(started.get("targets") or [])
        if not as_json:
            count = started.get("counts", {}).get("total", len(labels))
            render.note(f"run {run_id}: {count} targets")
            runs.watch(api, started, labels)
        else:
            runs.follow(api, run_id, lambda event: None)
        final = runs.run_detail(api, run_id)
    except KeyboardInterrupt:
        _interrupted(api, run_id)
    if as_json:
        render.print_json(runs.with_output(api, final))
    else:
        render.run_summary(final, runs.labels_for(final.get("targets") or []))
    raise typer.Exit(0 if runs.all_succeeded(final) else 1)


def _interrupted(api: Client, run_id: int | None) -> NoReturn:
    """Ctrl-C during a run: cancel the run this command started, say so, exit 130."""
    if run_id is None:
        render.error("interrupted before the server answered; the run may have started")
        raise typer.Exit(INTERRUPTED)
    try:
        runs.cancel_run(api, run_id)
        render.error(f"interrupted: run {run_id} cancelled")
    except CliError as exc:
        render.error(f"interrupted: could not cancel run {run_id}: {exc}")
    raise typer.Exit(INTERRUPTED)


@app.command()
def cancel(run_id: Annotated[int, typer.Argument(help="The run to cancel.")]) -> None:
    """Cancel a run: targets not started end at once, running ones are killed."""
    answer = runs.cancel_run(client(), run_id)
    counts = answer.get("counts") or {}
    stopping = counts.get("running", 0) + counts.get("queued", 0)
    if answer.get("status") == "running" and stopping:
        render.note(f"run {run_id}: cancelling ({stopping} targets being stopped by their agents)")
    else:
        render.note(f"run {run_id}: {answer.get('status')}")


@app.command()
def upgrade(
    targets: Annotated[
        list[str],
        typer.Argument(metavar="TARGET", help="hostname, agent id, tag:NAME, server:ID, all"),
    ],
) -> None:
    """Upgrade agents to the agent version the server serves.

    Through the agent when it is online, over SSH when it is not. Exit 1 when any was refused.
    """
    api = client()
    rows = []
    for agent in resolve_agents(api, parse_targets(targets)):
        try:
            answer = api.post(f"/api/agents/{agent['id']}/upgrade/")
            rows.append({"agent": agent, **answer})
        except CliError as exc:
            if exc.status not in (400, 404, 409):
                raise
            rows.append({"agent": agent, "error": str(exc)})
    render.upgrade_table(rows)
    raise typer.Exit(1 if any(row.get("error") for row in rows) else 0)


@app.command()
def templates(as_json: JsonOption = False) -> None:
    """List your command templates."""
    found = client().get_all("/api/agents/command-templates/")
    if as_json:
        render.print_json(found)
    else:
        render.templates_table(found)


@app.command()
def status(
    agent: Annotated[str, typer.Argument(help="The agent: its id or hostname.")],
    as_json: JsonOption = False,
) -> None:
    """Check that an agent answers on its RPC endpoint; exit 1 when it does not."""
    api = client()
    found = resolve_one(api, agent)
    answer = api.post(f"/api/agents/{found['id']}/check_status/")
    if as_json:
        render.print_json({"agent": found["id"], "hostname": found["hostname"], **answer})
    else:
        render.status_check(found, answer)
    raise typer.Exit(0 if answer.get("reachable") else 1)
