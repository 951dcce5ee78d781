"""A real OpenSSH server on a loopback port, for the SSH deployment tests.

It runs as the current user (root on the test machine) with a throwaway host key and a
throwaway client key in its authorized keys, so the tests exercise the same ssh, sftp and
host-key checks a real managed host would, without touching the machine's own sshd.
"""

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, kill_group, spawn, wait_for

SSHD = Path("/usr/sbin/sshd")


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tether-tests", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


class Sshd:
    """`sshd -D` on 127.0.0.1:<port>; `client_key` logs in as the current user. `settings`
    are sshd_config lines that take precedence over the defaults here."""

    def __init__(self, root: Path, settings: tuple[str, ...] = ()) -> None:
        self.root = root
        self.port = free_port()
        self.settings = settings
        self.host_key = root / "host_ed25519"
        self.client_key = root / "client_ed25519"
        self.config = root / "sshd_config"
        self.log = root / "sshd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def host_public_key(self) -> str:
        """The host key as a known_hosts line would carry it: `type base64`."""
        return " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])

    def start(self) -> "Sshd":
        _keygen(self.host_key)
        _keygen(self.client_key)
        authorized = self.root / "authorized_keys"
        authorized.write_text(self.client_key.with_suffix(".pub").read_text())
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    # sshd keeps the first value of a keyword: these override the ones below.
                    *self.settings,
                    f"HostKey {self.host_key}",
                    f"PidFile {self.root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "StrictModes no",
                    "UsePAM no",
                    "Subsystem sftp internal-sftp",
                    # Ansible opens several sessions over one multiplexed connection.
                    "MaxSessions 20",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        # Privilege separation needs this directory; a fresh container may not have it.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.proc = spawn(
            [str(SSHD), "-D", "-e", "-f", str(self.config)], env=dict(os.environ), log=self.log
        )
        wait_for(self._answers, timeout=20, interval=0.05, what="sshd banner")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-2000:]
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn,
        ):
            return conn.recv(64).startswith(b"SSH-2.0-")
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc)


@pytest.fixture(scope="module", name="sshd")
def sshd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not SSHD.exists() or shutil.which("ssh") is None:
        pytest.skip("openssh-server and openssh-client are needed (.ci/run installs them)")
    server = Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()
