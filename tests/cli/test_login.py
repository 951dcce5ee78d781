"""`tetherctl login` against a real server: the token is stored privately and used after;
the environment overrides it; refusals are one line and exit 2."""

import json
import stat
from pathlib import Path

import pytest

from tests.cli.conftest import PASSWORD, Operator, clean_env, tetherctl
from tests.conftest import free_port

pytestmark = pytest.mark.e2e


def test_it_stores_the_url_and_a_token_only_the_user_can_read(operator: Operator) -> None:
    env = clean_env(operator.home, TETHER_PASSWORD=PASSWORD)

    done = tetherctl("login", operator.tether.url + "/", "--username", operator.username, env=env)

    assert done.returncode == 0, done.stderr
    assert f"logged in to {operator.tether.url} as {operator.username}" in done.stderr
    path = operator.home / ".config" / "tether" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stored = json.loads(path.read_text())
    assert stored["url"] == operator.tether.url
    assert stored["token"] and stored["token"] != PASSWORD

    listed = tetherctl("agents", "--json", env=clean_env(operator.home))
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


def test_it_asks_for_the_password_when_the_environment_has_none(operator: Operator) -> None:
    env = clean_env(operator.home)

    done = tetherctl(
        "login", operator.tether.url, "--username", operator.username, env=env, input=PASSWORD
    )

    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert (operator.home / ".config" / "tether" / "config.json").exists()


def test_a_wrong_password_is_one_line_and_exit_2(operator: Operator) -> None:
    env = clean_env(operator.home, TETHER_PASSWORD="wrong")

    done = tetherctl("login", operator.tether.url, "--username", operator.username, env=env)

    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "tetherctl: login failed: refused (400): Unable to log in with provided credentials."
    ]
    assert not (operator.home / ".config" / "tether").exists()


def test_the_environment_overrides_the_stored_login(operator: Operator) -> None:
    env = clean_env(operator.home, TETHER_PASSWORD=PASSWORD)
    logged_in = tetherctl("login", operator.tether.url, "--username", operator.username, env=env)
    assert logged_in.returncode == 0, logged_in.stderr

    bad_token = clean_env(operator.home, TETHER_TOKEN="0" * 40)
    refused = tetherctl("agents", env=bad_token)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == ["tetherctl: authentication failed (401): Invalid token."]

    elsewhere = clean_env(operator.home, TETHER_URL=f"http://127.0.0.1:{free_port()}")
    unreachable = tetherctl("agents", env=elsewhere)
    assert unreachable.returncode == 2
    assert len(unreachable.stderr.splitlines()) == 1
    assert "cannot connect to http://127.0.0.1:" in unreachable.stderr


def test_without_a_login_every_command_says_how_to_log_in(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    for args in (["agents"], ["run", "all", "--", "true"], ["status", "web-1"], ["templates"]):
        done = tetherctl(*args, env=env)

        assert done.returncode == 2, args
        assert done.stderr.splitlines() == [
            "tetherctl: not logged in: run `tetherctl login URL` (or set TETHER_URL and "
            "TETHER_TOKEN)"
        ], args
        assert done.stdout == ""


def log_in(operator: Operator) -> tuple[dict[str, str], str]:
    env = clean_env(operator.home, TETHER_PASSWORD=PASSWORD)
    done = tetherctl("login", operator.tether.url, "--username", operator.username, env=env)
    assert done.returncode == 0, done.stderr
    path = operator.home / ".config" / "tether" / "config.json"
    return clean_env(operator.home), json.loads(path.read_text())["token"]


def test_logout_revokes_the_token_and_forgets_the_login(operator: Operator) -> None:
    env, token = log_in(operator)
    with_token = clean_env(operator.home, TETHER_URL=operator.tether.url, TETHER_TOKEN=token)

    done = tetherctl("logout", env=env)

    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"logged out of {operator.tether.url}: token ")
    assert not (operator.home / ".config" / "tether" / "config.json").exists()
    refused = tetherctl("agents", env=with_token)
    assert refused.stderr.splitlines() == ["tetherctl: authentication failed (401): Invalid token."]
    again = tetherctl("logout", env=env)
    assert (again.returncode, again.stderr.strip()) == (0, "not logged in: nothing to do")


def test_logout_finds_the_token_of_a_login_stored_without_its_id(operator: Operator) -> None:
    env, token = log_in(operator)
    path = operator.home / ".config" / "tether" / "config.json"
    path.write_text(json.dumps({"url": operator.tether.url, "token": token}))  # an older login
    other, _ = operator.api.post("/api/auth/tokens/", {"name": "kept"})
    assert other == 201

    done = tetherctl("logout", env=env)

    assert done.returncode == 0, done.stderr
    names = [t["name"] for t in operator.api.get("/api/auth/tokens/")[1]["results"]]
    assert "kept" in names and not path.exists()
    assert (
        tetherctl(
            "agents",
            env=clean_env(operator.home, TETHER_URL=operator.tether.url, TETHER_TOKEN=token),
        ).returncode
        == 2
    )


def test_logout_keeps_the_login_when_the_server_is_unreachable(operator: Operator) -> None:
    env, token = log_in(operator)
    path = operator.home / ".config" / "tether" / "config.json"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "url": f"http://127.0.0.1:{free_port()}"}))

    done = tetherctl("logout", env=env)

    assert done.returncode == 2
    assert done.stderr.startswith("tetherctl: logout failed, login kept: cannot connect")
    assert json.loads(path.read_text())["token"] == token


def test_logout_forgets_a_token_that_no_longer_works(operator: Operator) -> None:
    env, token = log_in(operator)
    path = operator.home / ".config" / "tether" / "config.json"
    token_id = json.loads(path.read_text())["token_id"]
    assert operator.ctl("tokens", "revoke", token_id).returncode == 0

    done = tetherctl("logout", env=env)

    assert done.returncode == 0, done.stderr
    assert "the token no longer worked" in done.stderr and not path.exists()
