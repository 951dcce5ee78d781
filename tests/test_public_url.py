"""What agents are given as the server's URL, and which Host names the server answers to by
default: what it was started with, never what a request says (issue 13, row 8)."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT

FQDN = socket.getfqdn()


def started_with(tmp_path: Path, **env: str) -> tuple[str, list[str]]:
    """PUBLIC_URL and ALLOWED_HOSTS of a Tether process with these variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    result = subprocess.run(
        [
            str(BIN / "tether"),
            "shell",
            "-c",
            "import json; from django.conf import settings as s; "
            "print(json.dumps([s.PUBLIC_URL, s.ALLOWED_HOSTS]))",
        ],
        env={**clean, "TETHER_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    url, hosts = json.loads(result.stdout.strip().splitlines()[-1])
    return url, hosts


@pytest.mark.parametrize(
    ("env", "url", "host"),
    [
        ({}, "http://127.0.0.1:8000", "127.0.0.1"),
        ({"TETHER_BIND": "10.1.2.3:9000", "TETHER_TLS": "1"}, "https://10.1.2.3:9000", "10.1.2.3"),
        ({"TETHER_BIND": "0.0.0.0:8000"}, f"http://{FQDN}:8000", FQDN),
        ({"TETHER_BIND": "[::1]:8000"}, "http://[::1]:8000", "[::1]"),
        (
            {"TETHER_PUBLIC_URL": "https://tether.example.com/"},
            "https://tether.example.com",
            "tether.example.com",
        ),
    ],
)
def test_the_public_url_is_the_configured_one_else_the_bind(
    tmp_path: Path, env: dict[str, str], url: str, host: str
) -> None:
    public_url, hosts = started_with(tmp_path, **env)
    assert public_url == url
    assert "*" not in hosts
    assert {"localhost", "127.0.0.1", "[::1]", FQDN, host} <= set(hosts)


def test_allowed_hosts_are_the_operators_when_set(tmp_path: Path) -> None:
    _, hosts = started_with(tmp_path, TETHER_ALLOWED_HOSTS="tether.example.com, .example.org")
    assert hosts == ["tether.example.com", ".example.org"]
