"""Install, upgrade, stop or start an agent over SSH: install_agent.yml run by ansible-runner.

This is the path for hosts whose agent cannot act for itself (offline, stopped, not yet
installed, or of the original dialect). It runs on a background worker thread, one
deployment per call. Everything Ansible needs is written as data into a private directory
(inventory, extra vars, key, known_hosts) that is removed afterwards; Ansible's events are
turned into log lines as they arrive, so operators watch the run live. What those files say
and how the events read is ansible_io.py (pure functions); this module is the run.

Host keys are trusted on first use by OpenSSH itself: the first run accepts and records the
host's keys in `Server.ssh_known_hosts`; later runs accept only those (a changed key fails).
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings

from tether.fleet.agent_files import agent_version
from tether.fleet.credentials import decrypt
from tether.fleet.models import Agent, Server

from . import services
from .ansible_io import EventLog, ansible_env, as_data, build_extravars, build_inventory
from .models import Deployment

log = logging.getLogger("tether.deploy.ssh")

PLAYBOOK_DIR = Path(__file__).resolve().parent / "playbooks"
PLAYBOOK = "install_agent.yml"
# How often the run and the wait for the agent look at the database for a cancel.
CANCEL_CHECK_INTERVAL = 0.5
ONLINE_POLL_INTERVAL = 0.25

# ansible-runner's own statuses (Runner.status), not a Deployment.Status.
RUNNER_SUCCESSFUL = "successful"
RUNNER_FAILED = "failed"
RUNNER_TIMEOUT = "timeout"
RUNNER_CANCELED = "canceled"


def _write_private(path: Path, text: str) -> None:
    """The key and the token must never be readable by another user, not even for a moment:
    created with mode 0600 rather than chmod-ed after writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


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
        services.finish_deployment(
            deployment=deployment, status=Deployment.Status.FAILED, line=f"failed: {line}"
        )

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
    writes_config = deployment.kind in (Deployment.Kind.INSTALL, Deployment.Kind.UPGRADE)
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
        _stop_leftovers(workdir)
        shutil.rmtree(workdir, ignore_errors=True)

    if status == RUNNER_CANCELED or _cancelled(deployment_id):
        return  # cancel_deployment has already ended it
    if status == RUNNER_TIMEOUT:
        return fail(f"the playbook did not finish within {int(settings.DEPLOY_SSH_TIMEOUT)} s")
    if status != RUNNER_SUCCESSFUL:
        return fail(failure or f"ansible-playbook ended {status}")

    if deployment.kind == Deployment.Kind.STOP:
        services.agent_stopped(deployment)
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
        kind=deployment.kind, server=server, server_url=server_url, enrollment_token=token
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
    if runner.status == RUNNER_FAILED and not failure:
        # No task failed: Ansible itself did not start or stopped early (bad playbook, no
        # ansible-playbook); its last words say why.
        failure = events.redact(_tail(runner))
    return runner.status, failure


def _stop_leftovers(workdir: Path) -> None:
    """End what a run may leave behind before its directory is removed, so that nothing
    recreates it: the multiplexing connections (ControlPersist), which a cancelled run never
    closes, and any process still using the directory (a master still connecting when Ansible
    was killed lives on in a session of its own and records a host key there; Ansible's forked
    workers can outlive a killed ansible-playbook). Ask each socket to exit, then stop every
    process whose command line names a path in this run's directory."""
    for socket_path in (workdir / "cp").glob("*"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "tether-deploy"],
                capture_output=True,
                timeout=5,
                check=False,
            )
    # With the separator: run 12's marker must not match run 123's paths.
    marker = (str(workdir) + "/").encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
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
    if deployment.kind == Deployment.Kind.INSTALL:
        # The agent that registered with this deployment's token (record_enrolled_agent).
        deployment.refresh_from_db(fields=["agent"])
        if deployment.agent_id is None:
            return None
    agents = Agent.objects.filter(pk=deployment.agent_id, last_heartbeat__gt=started)
    if deployment.kind == Deployment.Kind.INSTALL:
        return agents.first()
    if deployment.kind == Deployment.Kind.UPGRADE:
        target = deployment.target_version or agent_version()
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
                status=Deployment.Status.SUCCEEDED,
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
        _stop_leftovers(path)
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)
