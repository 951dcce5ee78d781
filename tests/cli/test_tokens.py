"""`tetherctl tokens` and the token `tetherctl login` makes, against a real server: a new
token is printed once and works, the list never shows a secret, a revoked token is refused."""

import json
import socket

import pytest

from tests.cli.conftest import PASSWORD, Operator, clean_env, tetherctl

pytestmark = pytest.mark.e2e


def test_login_makes_a_token_named_for_this_machine(operator: Operator) -> None:
    env = clean_env(operator.home, TETHER_PASSWORD=PASSWORD)
    logged_in = tetherctl("login", operator.tether.url, "--username", operator.username, env=env)
    assert logged_in.returncode == 0, logged_in.stderr

    listed = tetherctl("tokens", "--json", env=clean_env(operator.home))

    assert listed.returncode == 0, listed.stderr
    names = [token["name"] for token in json.loads(listed.stdout)]
    assert f"tetherctl@{socket.gethostname()}" in names


def test_it_creates_lists_and_revokes_a_token(operator: Operator) -> None:
    created = operator.ctl("tokens", "create", "ci deploy", "--days", "3")

    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("tht_") and "\n" not in secret
    assert "shown this once" in created.stderr
    with_it = clean_env(operator.home, TETHER_URL=operator.tether.url, TETHER_TOKEN=secret)
    assert tetherctl("agents", "--json", env=with_it).returncode == 0

    table = operator.ctl("tokens")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if "ci deploy" in line)
    assert secret[:12] + "…" in row
    assert secret not in table.stdout
    [token] = [
        t for t in json.loads(operator.ctl("tokens", "--json").stdout) if t["name"] == "ci deploy"
    ]

    revoked = operator.ctl("tokens", "revoke", str(token["id"]))

    assert revoked.returncode == 0, revoked.stderr
    refused = tetherctl("agents", env=with_it)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == ["tetherctl: authentication failed (401): Invalid token."]
    assert "ci deploy" not in operator.ctl("tokens").stdout


def test_another_users_token_is_not_found(operator: Operator) -> None:
    other = operator.tether.create_user(f"{operator.username}-b", PASSWORD)
    status, body = other.post("/api/auth/tokens/", {"name": "theirs"})
    assert status == 201, body

    done = operator.ctl("tokens", "revoke", str(body["id"]))

    assert done.returncode == 2
    assert done.stderr.splitlines() == ["tetherctl: not found (404): Not found."]
    status, _ = other.get("/api/auth/tokens/")
    assert status == 200


def test_it_refuses_bad_lifetimes_in_one_line(operator: Operator) -> None:
    for args in (["--days", "0"], ["--days", "3", "--never-expires"]):
        done = operator.ctl("tokens", "create", "x", *args)

        assert done.returncode == 2, args
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert done.stdout == ""
    assert "x" not in [t["name"] for t in json.loads(operator.ctl("tokens", "--json").stdout)]
