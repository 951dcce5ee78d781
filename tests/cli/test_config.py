"""Where tetherctl keeps its login: created 0600 in a 0700 directory, overridden by the
environment, and a missing login says how to log in."""

import os
import stat
from pathlib import Path

import pytest

from tether_cli import config
from tether_cli.config import Login
from tether_cli.errors import CliError


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TETHER_URL", raising=False)
    monkeypatch.delenv("TETHER_TOKEN", raising=False)
    return tmp_path / "xdg"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_it_stores_the_login_in_a_file_only_the_user_can_read(config_home: Path) -> None:
    path = config.save_login(Login(url="http://tether.test", token="t0k"))

    assert path == config_home / "tether" / "config.json"
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert config.current_login() == Login(url="http://tether.test", token="t0k")


def test_the_file_is_created_private_not_made_private_afterwards(
    config_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_chmod(*args: object, **kw: object) -> None:
        raise AssertionError("chmod called: the file was readable by others for a moment")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    old_umask = os.umask(0)  # nothing masks the mode the file is created with
    try:
        path = config.save_login(Login(url="http://tether.test", token="t0k"))
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o600


def test_logging_in_again_replaces_the_login(config_home: Path) -> None:
    config.save_login(Login(url="http://one.test", token="a"))
    path = config.save_login(Login(url="http://two.test", token="b"))

    assert config.current_login() == Login(url="http://two.test", token="b")
    assert mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_it_defaults_to_the_home_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    assert config.config_path() == tmp_path / ".config" / "tether" / "config.json"


def test_the_environment_overrides_each_part_of_the_stored_login(
    config_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config.save_login(Login(url="http://stored.test", token="stored"))

    monkeypatch.setenv("TETHER_TOKEN", "from-env")
    assert config.current_login() == Login(url="http://stored.test", token="from-env")

    monkeypatch.setenv("TETHER_URL", "http://env.test/")
    assert config.current_login() == Login(url="http://env.test", token="from-env")


def test_the_environment_alone_is_a_login(
    config_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_URL", "https://env.test")
    monkeypatch.setenv("TETHER_TOKEN", "from-env")

    assert config.current_login() == Login(url="https://env.test", token="from-env")
    assert not config.config_path().exists()


def test_without_a_login_it_says_how_to_log_in(config_home: Path) -> None:
    with pytest.raises(CliError, match=r"not logged in: run `tetherctl login URL`"):
        config.current_login()


def test_a_broken_config_file_is_one_clear_error(config_home: Path) -> None:
    config.save_login(Login(url="http://tether.test", token="t"))
    config.config_path().write_text("{not json")

    with pytest.raises(CliError, match="is not valid JSON: log in again"):
        config.current_login()


@pytest.mark.parametrize("url", ["tether.test", "ftp://tether.test", "http://", ""])
def test_it_refuses_what_is_not_a_server_url(url: str) -> None:
    with pytest.raises(CliError, match="not a server URL"):
        config.normalize_url(url)


def test_it_keeps_a_server_url_without_its_trailing_slash() -> None:
    assert config.normalize_url(" https://tether.test:8443/ ") == "https://tether.test:8443"
