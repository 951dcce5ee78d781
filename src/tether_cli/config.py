"""Where tetherctl keeps its login: `{url, token, token_id}` in
`$XDG_CONFIG_HOME/tether/config.json`
(default `~/.config/tether/`), the directory 0700 and the file 0600 from the moment it exists.
`TETHER_URL` and `TETHER_TOKEN` override what is stored, each on its own (scripts, CI)."""

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CliError

HOW_TO_LOG_IN = "run `tetherctl login URL` (or set TETHER_URL and TETHER_TOKEN)"


@dataclass(frozen=True)
class Login:
    url: str
    token: str
    # The token's id on its server (what `tetherctl logout` revokes); logins stored by
    # earlier releases have none, and logout then finds it by the token's prefix.
    token_id: str = ""


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tether"


def config_path() -> Path:
    return config_dir() / "config.json"


def normalize_url(url: str) -> str:
    """The server's base URL without a trailing slash; refused unless http(s)."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or len(url) <= len("https://"):
        raise CliError(f"not a server URL: {url!r} (expected http://HOST[:PORT] or https://...)")
    return url


def save_login(login: Login) -> Path:
    """Store the login, replacing any other. The file is written beside its final name with
    mode 0600 at creation (never readable by others, not even for a moment) and renamed."""
    path = config_path()
    temporary = path.with_name(f".config.json.{os.getpid()}")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            stored = {"url": login.url, "token": login.token}
            if login.token_id:
                stored["token_id"] = login.token_id
            json.dump(stored, file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise CliError(f"cannot store the login in {path}: {exc.strerror or exc}") from exc
    return path


def forget_login() -> None:
    """Delete the stored login (nothing to do when there is none)."""
    path = config_path()
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise CliError(f"cannot delete {path}: {exc.strerror or exc}") from exc


def stored_login() -> dict[str, str]:
    """What the config file holds (empty when there is none)."""
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CliError(f"{path} is not valid JSON: log in again ({HOW_TO_LOG_IN})") from exc
    if not isinstance(data, dict):
        raise CliError(f"{path} is not a tetherctl login: log in again ({HOW_TO_LOG_IN})")
    return {key: value for key, value in data.items() if isinstance(value, str)}


def current_login() -> Login:
    """The login to use: the environment's `TETHER_URL`/`TETHER_TOKEN` first, then the file."""
    url = os.environ.get("TETHER_URL", "")
    token = os.environ.get("TETHER_TOKEN", "")
    if not (url and token):
        stored = stored_login()
        url = url or stored.get("url", "")
        token = token or stored.get("token", "")
    if not url or not token:
        raise CliError(f"not logged in: {HOW_TO_LOG_IN}")
    return Login(url=normalize_url(url), token=token)
