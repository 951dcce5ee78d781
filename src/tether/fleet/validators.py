"""The rules for a server's fields, in one place: the model carries them, so the API's
serializer, the web form and anything that saves a Server refuse the same input with the same
message. Each value ends up on an ssh or Ansible command line, or in a systemd unit."""

import re

from django.core.exceptions import ValidationError

AGENT_DIR = re.compile(r"/[A-Za-z0-9._/+-]{1,254}")
SSH_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
NAME_TAKEN = "You already have a server with this name."


def validate_host(value: str) -> None:
    """A host name or address: nothing ssh could read as an option, no whitespace."""
    if any(c.isspace() for c in value) or value.startswith("-"):
        raise ValidationError("Enter a host name or address.", code="invalid")


def validate_ssh_user(value: str) -> None:
    """A plain user name: no shell or ssh metacharacters."""
    if not SSH_USER.fullmatch(value):
        raise ValidationError("Enter a user name (letters, digits, _ . -).", code="invalid")


def validate_agent_dir(value: str) -> None:
    """It ends up in a systemd ExecStart line and in the agent's paths: a plain absolute
    path."""
    if not AGENT_DIR.fullmatch(value) or "/../" in value + "/":
        raise ValidationError(
            "Enter an absolute path of letters, digits and . _ - + / only.", code="invalid"
        )
