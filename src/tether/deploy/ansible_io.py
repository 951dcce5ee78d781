"""What an SSH deployment hands Ansible, and how what Ansible says back reads in the log.

Kept apart from the run itself (ssh.py) because these are pure functions: no database, no
processes, no files, so each is unit-tested on its own with plain values. The run decides
when and where; this module decides what the extra vars, the inventory, the ssh options and
Ansible's environment say, and which line of Ansible's output an operator gets to read.
"""

import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

from tether.fleet.models import Server
from tether.pki.ca import pin_for_agents

AGENT_PYTHON = "/usr/bin/python3"
SSH_CONNECT_TIMEOUT = 10
# Outputs of a failed task quoted in the log, at most this many characters each.
MAX_QUOTED = 2000


# ---------------------------------------------------------------------------------------------
# Inputs: extra vars, inventory, ssh options
# ---------------------------------------------------------------------------------------------


def as_data(value: Any) -> Any:
    """Mark every string as unsafe for Ansible, which otherwise renders `{{ ... }}` found in
    extra vars and inventory variables as templates (a lookup there runs a command on this
    server). Ansible's JSON reader turns `{"__ansible_unsafe": s}` back into the plain `s`."""
    if isinstance(value, str):
        return {"__ansible_unsafe": value}
    if isinstance(value, dict):
        return {key: as_data(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [as_data(item) for item in value]
    return value


def build_extravars(
    *, kind: str, server: Server, server_url: str, enrollment_token: str
) -> dict[str, Any]:
    """The playbook's variables, written as JSON to env/extravars: data, never a shell string.
    `kind` is the deployment's Deployment.Kind, which the playbook takes as its action."""
    agent_dir = server.agent_dir.rstrip("/") or "/"
    agent_config = {
        "server": server_url,
        "server_token": enrollment_token,
        "state_dir": f"{agent_dir}/state",
    }
    # A server that vouches for itself with the built-in CA: the agent gets that CA as its
    # --ca-file, or its very first registration would fail verification.
    ca_pem = pin_for_agents() if server_url.startswith("https://") else None
    if ca_pem:
        agent_config["ca_file"] = f"{agent_dir}/ca.pem"
    return {
        "action": kind,
        "agent_dir": agent_dir,
        "agent_python": AGENT_PYTHON,
        "agent_files": {
            "main": str(settings.AGENT_DIR / "main.py"),
            "requirements": str(settings.AGENT_DIR / "requirements.txt"),
        },
        "agent_config": agent_config,
        "ca_certificate": ca_pem or "",
    }


def ssh_common_args(*, known_hosts: Path, host_keys_recorded: bool) -> str:
    """OpenSSH does the host-key checking: it records keys on first use (accept-new) into the
    per-deployment file, and once keys are recorded accepts nothing else ("yes"), so that a
    host cannot slip past by offering a key of a type not yet recorded."""
    options = {
        "UserKnownHostsFile": str(known_hosts),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes" if host_keys_recorded else "accept-new",
        "HashKnownHosts": "no",
        "ConnectTimeout": str(SSH_CONNECT_TIMEOUT),
        "BatchMode": "yes",
        "IdentitiesOnly": "yes",
    }
    return shlex.join(arg for name, value in options.items() for arg in ("-o", f"{name}={value}"))


def build_inventory(*, server: Server, key_file: Path, known_hosts: Path) -> dict[str, Any]:
    """Every connection setting as a variable of the one host, so that it reaches Ansible as
    data (never a command line built by hand) and names the run's own key and known_hosts."""
    return {
        "all": {
            "hosts": {
                server.host: {
                    "ansible_host": server.host,
                    "ansible_port": server.ssh_port,
                    "ansible_user": server.ssh_user,
                    "ansible_connection": "ssh",
                    "ansible_ssh_private_key_file": str(key_file),
                    "ansible_ssh_common_args": ssh_common_args(
                        known_hosts=known_hosts,
                        host_keys_recorded=bool(server.ssh_known_hosts.strip()),
                    ),
                    "ansible_python_interpreter": AGENT_PYTHON,
                }
            }
        }
    }


def ansible_env(workdir: Path) -> dict[str, str]:
    """Environment of ansible-playbook: this venv's Ansible, nothing written outside the
    deployment's directory, and the few settings that make a short playbook fast."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/bin:/bin")]),
        "ANSIBLE_HOME": str(workdir / "ansible"),
        "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible" / "tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(workdir / "cp"),
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=15s",
        # ansible-runner turns host key checking off unless told otherwise, and then Ansible
        # passes StrictHostKeyChecking=no ahead of ours (OpenSSH keeps the first value).
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_TIMEOUT": str(SSH_CONNECT_TIMEOUT),
        "ANSIBLE_NOCOLOR": "True",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_SYSTEM_WARNINGS": "False",
        "ANSIBLE_GATHERING": "explicit",
    }


# ---------------------------------------------------------------------------------------------
# Outputs: Ansible events as log lines, failures as one clear reason
# ---------------------------------------------------------------------------------------------


def _quote(text: Any) -> str:
    """A failed command's output can be long; its end is where it says why."""
    text = str(text or "").strip()
    return text if len(text) <= MAX_QUOTED else "..." + text[-MAX_QUOTED:]


UNREACHABLE_PREAMBLE = re.compile(r"^.*?can be reached over ssh:\s*", re.DOTALL)


def ssh_error(message: str) -> str:
    """OpenSSH's own last words from Ansible's unreachable message, without Ansible's preamble
    or the warning banner (whose advice names a file that is gone after the run)."""
    text = UNREACHABLE_PREAMBLE.sub("", str(message or ""))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[-2:]) if lines else "no message"


def event_lines(event: dict[str, Any]) -> list[str]:
    """The log lines of one ansible-runner event, in the shape of Ansible's own output."""
    kind = event.get("event", "")
    data = event.get("event_data") or {}
    host = data.get("host") or data.get("remote_addr") or ""
    res = data.get("res") if isinstance(data.get("res"), dict) else {}
    if kind == "playbook_on_play_start":
        return [f"PLAY [{data.get('play') or data.get('name') or ''}]"]
    if kind == "playbook_on_task_start":
        return [f"TASK [{data.get('task') or data.get('name') or ''}]"]
    if kind == "runner_on_ok":
        return [f"{'changed' if res.get('changed') else 'ok'}: [{host}]"]
    if kind == "runner_on_skipped":
        return [f"skipping: [{host}]"]
    if kind in ("runner_on_failed", "runner_on_unreachable"):
        verb = "unreachable" if kind == "runner_on_unreachable" else "failed"
        if data.get("ignore_errors"):
            verb += " (ignored)"
        msg = ssh_error(res.get("msg", "")) if verb == "unreachable" else _quote(res.get("msg"))
        lines = [f"{verb}: [{host}]" + (f": {msg}" if msg else "")]
        for stream in ("stderr", "stdout"):
            if res.get(stream):
                lines.append(f"  {stream}: {_quote(res[stream])}")
        return lines
    if kind == "playbook_on_stats":
        names = {"ok": "ok", "changed": "changed", "dark": "unreachable", "failures": "failed"}
        counts = (
            f"{shown}={sum((data.get(name) or {}).values())}" for name, shown in names.items()
        )
        return ["PLAY RECAP " + " ".join(counts)]
    return []


HOST_KEY_SIGNS = (
    "host key verification failed",
    "remote host identification has changed",
    "host key is known",
)


def failure_reason(kind: str, message: str, server: Server) -> str:
    """One line that says what went wrong and what to do about it. `kind` is the
    ansible-runner event ("runner_on_failed", "runner_on_unreachable")."""
    lowered = message.lower()
    where = f"{server.ssh_user}@{server.host}:{server.ssh_port}"
    if any(sign in lowered for sign in HOST_KEY_SIGNS):
        return (
            f"host key verification failed: the host key of {where} changed since it was first "
            "recorded; if the host was reinstalled, forget the recorded key "
            f"(POST /api/servers/{server.pk}/forget_host_key/) and run again"
        )
    if kind == "runner_on_unreachable" and "permission denied" in lowered:
        return f"SSH authentication failed for {where}: {ssh_error(message)}"
    if kind == "runner_on_unreachable":
        return f"host unreachable: {where}: {ssh_error(message)}"
    return f"task failed: {_quote(message)}"


@dataclass
class EventLog:
    """Turns events into log lines as they arrive, and remembers the first failure."""

    write: Callable[[str], None]
    server: Server
    secrets: list[str] = field(default_factory=list)
    failure: str = ""
    current_task: str = ""

    def redact(self, text: str) -> str:
        """A task's message or output can quote what it was given (the enrollment token, the
        private key); neither may reach the deployment's log."""
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "[redacted]")
        return text

    def __call__(self, event: dict[str, Any]) -> bool:
        data = event.get("event_data") or {}
        if event.get("event") == "playbook_on_task_start":
            self.current_task = data.get("task") or ""
        if event.get("event") in ("runner_on_failed", "runner_on_unreachable"):
            res = data.get("res") if isinstance(data.get("res"), dict) else {}
            if not data.get("ignore_errors") and not self.failure:
                detail = res.get("msg") or res.get("stderr") or "no message"
                if event["event"] == "runner_on_failed" and self.current_task:
                    detail = f"{self.current_task}: {detail}"
                self.failure = self.redact(failure_reason(event["event"], str(detail), self.server))
        lines = event_lines(event)
        if lines:
            self.write(self.redact("\n".join(lines)))
        return False  # nothing to keep on disk: the directory goes away after the run
