"""Install, upgrade, stop or start an agent over SSH: install_agent.yml run by ansible-runner.

This is the path for hosts whose agent cannot act for itself (offline, stopped, not yet
installed, or of the original dialect). It runs on a background worker thread, one
deployment per call. Everything Ansible needs is written as data into a private directory
(inventory, extra vars, key, known_hosts) that is removed afterwards; Ansible's events are
turned into log lines as they arrive, so operators watch the run live.

Host keys are trusted on first use by OpenSSH itself: the first run accepts and records the
host's keys in `Server.ssh_known_hosts`; later runs accept only those (a changed key fails).
"""

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

from tether.fleet.credentials import decrypt
from tether.fleet.models import Agent, Server
from tether.pki.ca import pin_for_agents

from . import services
from .models import Deployment

log = logging.getLogger("tether.deploy.ssh")

PLAYBOOK_DIR = Path(__file__).resolve().parent / "playbooks"
PLAYBOOK = "install_agent.yml"
AGENT_PYTHON = "/usr/bin/python3"
SSH_CONNECT_TIMEOUT = 10
# How often the run and the wait for the agent look at the database for a cancel.
CANCEL_CHECK_INTERVAL = 0.5
ONLINE_POLL_INTERVAL = 0.25
# Outputs of a failed task quoted in the log, at most this many characters each.
MAX_QUOTED = 2000

K = Deployment.Kind
S = Deployment.Status


# ---------------------------------------------------------------------------------------------
# Inputs: extra vars, inventory, ssh options (pure functions, unit-tested)
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
    *, deployment: Deployment, server: Server, server_url: str, enrollment_token: str
) -> dict[str, Any]:
    """The playbook's variables, written as JSON to env/extravars: data, never a shell string."""
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
        "action": deployment.kind,
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


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# Outputs: Ansible events as log lines, failures as one clear reason (pure, unit-tested)
# ---------------------------------------------------------------------------------------------


def _quote(text: Any) -> str:
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
    """One line that says what went wrong and what to do about it."""
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


class CancelCheck:
    """ansible-runner's cancel_callback: true once the deployment was cancelled, reading the
    database at most every CANCEL_CHECK_INTERVAL seconds however often it is asked."""

    def __init__(self, deployment_id: int) -> None:
        self.deployment_id = deployment_id
        self.next_check = 0.0
        self.cancelled = False

    def __call__(self) -> bool:
        if not self.cancelled and time.monotonic() >= self.next_check:
            self.next_check = time.monotonic() + CANCEL_CHECK_INTERVAL
            self.cancelled = _cancelled(self.deployment_id)
        return self.cancelled


# ---------------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------------


def run_ssh_deployment(deployment_id: int) -> None:
    """Run one SSH deployment to its end: the playbook, then (install, upgrade, start) the
    wait for the agent to come online. Every outcome ends the deployment with a clear line."""
    deployment = Deployment.objects.select_related("server").get(pk=deployment_id)
    if deployment.status in services.FINAL:
        return
    server = deployment.server

    def write(text: str) -> None:
        services.append_log(deployment_id=deployment_id, text=text)

    def fail(line: str) -> None:
        services.finish_deployment(deployment=deployment, status=S.FAILED, line=f"failed: {line}")

    services.ssh_run_started(deployment)
    write(
        f"{deployment.kind} over SSH: {server.ssh_user}@{server.host}:{server.ssh_port}, "
        f"agent dir {server.agent_dir}"
    )
    if not server.ssh_private_key_encrypted:
        return fail(f"server {server.name!r} has no SSH private key")
    try:
        private_key = decrypt(server.ssh_private_key_encrypted)
    except ValueError:
        return fail("cannot decrypt the server's SSH private key (was TETHER_SECRET_KEY changed?)")

    # Only install and upgrade write agent.json (with a token that dies with this deployment);
    # stop and start act on the agent as it is configured on the host.
    writes_config = deployment.kind in (K.INSTALL, K.UPGRADE)
    server_url = services.public_url(deployment) if writes_config else ""
    if writes_config and not server_url:
        return fail("no URL for the agent to reach this server: set TETHER_PUBLIC_URL")
    token = services.new_enrollment_token(deployment) if writes_config else ""

    workdir = Path(settings.DATA_DIR) / "deployments" / str(deployment_id)
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        status, failure = _run_playbook(
            deployment=deployment,
            server=server,
            workdir=workdir,
            private_key=private_key,
            server_url=server_url,
            token=token,
            write=write,
        )
    finally:
        _close_ssh_masters(workdir / "cp")
        shutil.rmtree(workdir, ignore_errors=True)

    if status == "canceled" or _cancelled(deployment_id):
        return  # cancel_deployment has already ended it
    if status == "timeout":
        return fail(f"the playbook did not finish within {int(settings.DEPLOY_SSH_TIMEOUT)} s")
    if status != "successful":
        return fail(failure or f"ansible-playbook ended {status}")

    if deployment.kind == K.STOP:
        if deployment.agent_id is not None:
            Agent.objects.filter(pk=deployment.agent_id).update(status=Agent.Status.STOPPED)
        services.finish_deployment(deployment=deployment, status=S.SUCCEEDED, line="agent stopped")
        return
    write("playbook done; waiting for the agent to come online")
    _wait_online(deployment, fail)


def _run_playbook(
    *,
    deployment: Deployment,
    server: Server,
    workdir: Path,
    private_key: str,
    server_url: str,
    token: str,
    write: Callable[[str], None],
) -> tuple[str, str]:
    """Run install_agent.yml; (runner status, first failure line). Records the host keys
    OpenSSH accepted on first use."""
    import ansible_runner

    for sub in ("env", "inventory", "cp"):
        (workdir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    workdir.chmod(0o700)
    key_file = workdir / "ssh_key"
    # OpenSSH refuses a key without its final newline, or with CRLF line ends.
    _write_private(key_file, private_key.replace("\r\n", "\n").strip() + "\n")
    known_hosts = workdir / "known_hosts"
    _write_private(known_hosts, server.ssh_known_hosts)
    extravars = build_extravars(
        deployment=deployment, server=server, server_url=server_url, enrollment_token=token
    )
    _write_private(workdir / "env" / "extravars", json.dumps(as_data(extravars)))
    inventory = build_inventory(server=server, key_file=key_file, known_hosts=known_hosts)
    # JSON is YAML: the yaml inventory plugin reads it (and its unsafe marks) as data.
    _write_private(workdir / "inventory" / "hosts.yml", json.dumps(as_data(inventory)))

    events = EventLog(write=write, server=server, secrets=[token, private_key.strip()])
    runner = ansible_runner.run(
        private_data_dir=str(workdir),
        project_dir=str(PLAYBOOK_DIR),
        playbook=PLAYBOOK,
        inventory=str(workdir / "inventory"),
        envvars=ansible_env(workdir),
        event_handler=events,
        cancel_callback=CancelCheck(deployment.pk),
        timeout=int(settings.DEPLOY_SSH_TIMEOUT),
        quiet=True,
        settings={"suppress_ansible_output": True, "pexpect_timeout": CANCEL_CHECK_INTERVAL},
    )
    _record_host_keys(server, known_hosts)
    failure = events.failure
    if runner.status == "failed" and not failure:
        # No task failed: Ansible itself did not start or stopped early (bad playbook, no
        # ansible-playbook); its last words say why.
        failure = events.redact(_tail(runner))
    return runner.status, failure


def _close_ssh_masters(control_dir: Path) -> None:
    """End the multiplexing connections Ansible left behind (ControlPersist). A cancelled run
    never closes them, and a master still connecting when Ansible was killed lives on in a
    session of its own, where it would recreate the run's directory to record a host key: ask
    each socket to exit, then stop any ssh process still using this run's control path."""
    for socket_path in control_dir.glob("*"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "tether-deploy"],
                capture_output=True,
                timeout=5,
                check=False,
            )
    marker = str(control_dir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGTERM)


def _tail(runner: Any, lines: int = 5) -> str:
    try:
        text = runner.stdout.read()
    except (OSError, AttributeError, ValueError):
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def _record_host_keys(server: Server, known_hosts: Path) -> None:
    """Trust on first use: keep what OpenSSH accepted, once; later runs only compare."""
    if server.ssh_known_hosts.strip():
        return
    try:
        accepted = known_hosts.read_text()
    except OSError:
        return
    if accepted.strip():
        Server.objects.filter(pk=server.pk, ssh_known_hosts="").update(ssh_known_hosts=accepted)
        server.ssh_known_hosts = accepted


def _cancelled(deployment_id: int) -> bool:
    """Cancelled, or ended another way meanwhile (its deadline): stop working on it."""
    status = Deployment.objects.filter(pk=deployment_id).values_list("status", flat=True).first()
    return status is None or status in services.FINAL


def _online_agent(deployment: Deployment) -> Agent | None:
    """The agent this deployment waits for, once it has shown up as the deployment wants."""
    started = deployment.started_at
    if deployment.kind == K.INSTALL:
        # The agent that registered with this deployment's token (record_enrolled_agent).
        deployment.refresh_from_db(fields=["agent"])
        if deployment.agent_id is None:
            return None
    agents = Agent.objects.filter(pk=deployment.agent_id, last_heartbeat__gt=started)
    if deployment.kind == K.INSTALL:
        return agents.first()
    if deployment.kind == K.UPGRADE:
        target = deployment.target_version or services.agent_version()
        return agents.filter(version=target).first()
    return agents.filter(status=Agent.Status.ONLINE).first()


def _wait_online(deployment: Deployment, fail: Callable[[str], None]) -> None:
    deployment.refresh_from_db(fields=["started_at", "target_version", "agent"])
    deadline = time.monotonic() + settings.DEPLOY_ONLINE_DEADLINE
    while time.monotonic() < deadline:
        if _cancelled(deployment.pk):
            return
        agent = _online_agent(deployment)
        if agent is not None:
            services.finish_deployment(
                deployment=deployment,
                status=S.SUCCEEDED,
                line=f"agent {agent.hostname} online at version {agent.version or 'unknown'}",
            )
            return
        time.sleep(ONLINE_POLL_INTERVAL)
    fail(
        f"the agent did not come online within {int(settings.DEPLOY_ONLINE_DEADLINE)} s "
        f"(see {deployment.server.agent_dir}/agent.log on the host)"
    )


def remove_stale_run_dirs() -> int:
    """Run directories of deployments that ended (or are gone) but were never removed: a
    server stopped mid-run leaves one, with its key file. Workers call this when they start;
    a run still active (perhaps in another worker process) is left alone."""
    root = Path(settings.DATA_DIR) / "deployments"
    if not root.is_dir():
        return 0
    named = {p.name: p for p in root.iterdir() if p.is_dir() and p.name.isdigit()}
    active = set(
        Deployment.objects.filter(pk__in=[int(n) for n in named])
        .exclude(status__in=services.FINAL)
        .values_list("pk", flat=True)
    )
    stale = [path for name, path in named.items() if int(name) not in active]
    for path in stale:
        _close_ssh_masters(path / "cp")
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)
