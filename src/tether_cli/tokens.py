"""`tetherctl tokens`: the caller's API tokens (GET, POST /api/auth/tokens/, DELETE
/api/auth/tokens/{id}/). A new token's secret is printed once, alone on stdout, so that a
script can capture it."""

from typing import Annotated

import typer

from . import render
from .client import Client
from .config import current_login
from .errors import CliError

app = typer.Typer(
    help="Your API tokens: list them, create one, revoke one.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.callback(invoke_without_command=True)
def tokens(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List your API tokens: id, name, prefix, created, expires, last used (never a secret)."""
    if ctx.invoked_subcommand is not None:
        return
    found = Client(current_login()).get_all("/api/auth/tokens/")
    if as_json:
        render.print_json(found)
    else:
        render.tokens_table(found)


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="What the token is for, e.g. ci-deploy.")],
    days: Annotated[
        int | None, typer.Option(help="Days until it expires (default: the server's, 90).")
    ] = None,
    never_expires: Annotated[
        bool, typer.Option("--never-expires", help="A token that does not expire.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Create an API token and print it, once: the server keeps only its hash."""
    if never_expires and days is not None:
        raise CliError("give either --days or --never-expires, not both")
    body: dict[str, object] = {"name": name}
    if never_expires:
        body["expires_in_days"] = None
    elif days is not None:
        body["expires_in_days"] = days
    answer = Client(current_login()).post("/api/auth/tokens/", body)
    if as_json:
        render.print_json(answer)
        return
    expires = answer.get("expires_at") or "never"
    render.note(
        f"token {answer['id']} ({answer['name']}) created, expires {expires}; it is shown this once"
    )
    render.out.file.write(answer["token"] + "\n")
    render.out.file.flush()


@app.command()
def revoke(token_id: Annotated[int, typer.Argument(metavar="ID", help="The token's id.")]) -> None:
    """Revoke one of your API tokens: whatever uses it is refused from now on."""
    Client(current_login()).delete(f"/api/auth/tokens/{token_id}/")
    render.note(f"token {token_id} revoked")
