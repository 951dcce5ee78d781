"""The rules for a server's fields, in one place: the model carries them, so the API's
serializer, the web form and anything that saves a Server refuse the same input with the same
message. Each value ends up on an ssh or Ansible command line, or in a systemd unit."""

import ipaddress
import re

from django.core.exceptions import ValidationError

AGENT_DIR = re.compile(r"/[A-Za-z0-9._/+-]{1,254}")
SSH_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
NAME_TAKEN = "You already have a server with this name."


# A DNS name: labels of letters, digits, _ and -, none starting with -. Nothing else: not an
# option to ssh (a leading -), not an Ansible host pattern (`web[01:03]`, `a,b`, `*`), not a
# port (`host:22`: the port is ssh_port), not a shell word.
HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?"
)


def validate_host(value: str) -> None:
    """A host name or an IP address, and nothing else (see HOSTNAME)."""
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if not HOSTNAME.fullmatch(value):
        message = "Enter a host name or address."  # a port goes in ssh_port
        raise ValidationError(message, code="invalid")


def validate_ssh_user(value: str) -> None:
    """A plain user name: no shell or ssh metacharacters."""
    if not SSH_USER.fullmatch(value):
        raise ValidationError("Enter a user name (letters, digits, _ . -).", code="invalid")


def validate_agent_dir(value: str) -> None:
    """It ends up in a systemd ExecStart line and in the agent's paths: a plain absolute
    path."""
    segments = value.rstrip("/").split("/")[1:]
    bad_part = any(part in ("", ".", "..") for part in segments)
    if not AGENT_DIR.fullmatch(value) or not segments or bad_part:
        raise ValidationError(
            "Enter an absolute path of letters, digits and . _ - + / only.", code="invalid"
        )
