"""The SSH deployment's own logic, without ssh: what it hands Ansible, how Ansible's events read
in the log, host-key trust on first use, and how each outcome ends the deployment. The real
run against a real sshd is tests/e2e/test_ssh_deploy.py."""

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import jinja2
from django.test import SimpleTestCase, override_settings
from django.utils import timezone

from tether.deploy import ansible_io, services, ssh
from tether.deploy.models import Deployment
from tether.fleet.credentials import encrypt
from tether.fleet.models import Agent, Server

from ..base import BaseTestCase

PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n-----END OPENSSH PRIVATE KEY-----"
)


def read_data(path: Path) -> Any:
    """A file as Ansible reads it: JSON with unsafe-marked strings turned back into strings."""

    def plain(obj: dict) -> Any:
        return obj["__ansible_unsafe"] if set(obj) == {"__ansible_unsafe"} else obj

    return json.loads(path.read_text(), object_hook=plain)


class FakeRunner:
    def __init__(self, status: str) -> None:
        self.status = status
        self.rc = 0 if status == "successful" else 2
        self.stdout = mock.Mock(read=lambda: "ERROR! the playbook could not be read\n")


class ExtraVarsTestCase(BaseTestCase):
    def extravars(self, server_url: str) -> dict:
        deployment = services.create_deployment(
            server=self.server, agent=None, kind="install", method="ssh", user=self.alice
        )
        services.finish_deployment(deployment=deployment, status="cancelled")  # one at a time
        return ansible_io.build_extravars(
            kind=deployment.kind, server=self.server, server_url=server_url, enrollment_token="t"
        )

    @override_settings(SERVES_BUILTIN_TLS=True)
    def test_an_agent_of_a_server_its_own_ca_vouches_for_gets_that_ca(self) -> None:
        from tether.pki.ca import authority

        extravars = self.extravars("https://tether.test:8443")

        self.assertEqual(extravars["ca_certificate"], authority().pem)
        self.assertEqual(extravars["agent_config"]["ca_file"], "/opt/tether-agent/ca.pem")

    def test_no_ca_for_plain_http_or_someone_elses_certificate(self) -> None:
        for url in ("http://tether.test:8000", "https://tether.test"):
            with self.subTest(url=url):
                extravars = self.extravars(url)
                self.assertEqual(extravars["ca_certificate"], "")
                self.assertNotIn("ca_file", extravars["agent_config"])


class SshDeploymentTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.data_dir = Path(tempfile.mkdtemp())
        self.enterContext(override_settings(DATA_DIR=self.data_dir, DEPLOY_ONLINE_DEADLINE=0.5))
        Server.objects.filter(pk=self.server.pk).update(
            ssh_private_key_encrypted=encrypt(PRIVATE_KEY), agent_dir="/opt/tether agent/"
        )
        self.server.refresh_from_db()

    def deployment(self, kind: str, agent: Agent | None = None) -> Deployment:
        deployment = services.create_deployment(
            server=self.server, agent=agent, kind=kind, method="ssh", user=self.alice
        )
        Deployment.objects.filter(pk=deployment.pk).update(server_url="http://tether.test:8000")
        return deployment

    def run_with(self, deployment: Deployment, status: str, events=(), during=None) -> dict:
        """Run the deployment with ansible-runner replaced; what Ansible would have been given."""
        seen: dict[str, Any] = {}

        def fake_run(**kw: Any) -> FakeRunner:
            workdir = Path(kw["private_data_dir"])
            seen["kw"] = kw
            seen["extravars"] = read_data(workdir / "env" / "extravars")
            seen["inventory"] = read_data(workdir / "inventory" / "hosts.yml")
            seen["modes"] = {
                name: (workdir / name).stat().st_mode & 0o777
                for name in ("ssh_key", "known_hosts", "env/extravars", ".")
            }
            seen["key"] = (workdir / "ssh_key").read_text()
            for event in events:
                kw["event_handler"](event)
            if during:
                during(workdir)
            return FakeRunner(status)

        with mock.patch("ansible_runner.run", fake_run):
            ssh.run_ssh_deployment(deployment.pk)
        deployment.refresh_from_db()
        return seen

    def test_it_hands_ansible_its_variables_as_data_in_private_files(self) -> None:
        deployment = self.deployment("install")

        seen = self.run_with(deployment, "failed")

        extravars = seen["extravars"]
        self.assertEqual(extravars["action"], "install")
        self.assertEqual(extravars["agent_dir"], "/opt/tether agent")
        self.assertEqual(extravars["agent_python"], "/usr/bin/python3")
        self.assertEqual(extravars["agent_config"]["server"], "http://tether.test:8000")
        self.assertEqual(extravars["agent_config"]["state_dir"], "/opt/tether agent/state")
        self.assertTrue(Path(extravars["agent_files"]["main"]).is_file())
        self.assertTrue(Path(extravars["agent_files"]["requirements"]).is_file())
        # A registration token the server accepts only while this deployment runs.
        token = extravars["agent_config"]["server_token"]
        self.assertIsNone(services.deployment_for_enrollment_token(token))  # now failed
        self.assertEqual(seen["modes"], {n: 0o600 for n in seen["modes"]} | {".": 0o700})
        self.assertTrue(seen["key"].endswith("-----\n"))
        self.assertEqual(seen["kw"]["playbook"], "install_agent.yml")
        self.assertTrue((Path(seen["kw"]["project_dir"]) / "install_agent.yml").is_file())
        host = seen["inventory"]["all"]["hosts"]["10.0.0.1"]
        self.assertEqual((host["ansible_port"], host["ansible_user"]), (22, "root"))

    def test_the_token_is_valid_while_the_deployment_runs(self) -> None:
        deployment = self.deployment("install")
        found: list[Any] = []

        def during(workdir: Path) -> None:
            extravars = read_data(workdir / "env" / "extravars")
            token = extravars["agent_config"]["server_token"]
            found.append(services.deployment_for_enrollment_token(token).server)

        self.run_with(deployment, "failed", during=during)

        self.assertEqual(found, [self.server])

    def test_it_removes_its_directory_and_never_logs_key_or_token(self) -> None:
        deployment = self.deployment("upgrade", agent=self.agent)
        leak: dict[str, str] = {}

        def fake_run(**kw: Any) -> FakeRunner:
            extravars = read_data(Path(kw["private_data_dir"]) / "env" / "extravars")
            leak["token"] = extravars["agent_config"]["server_token"]
            res = {"msg": f"bad key {PRIVATE_KEY}", "stderr": f"token {leak['token']}"}
            kw["event_handler"]({"event": "runner_on_failed", "event_data": {"res": res}})
            return FakeRunner("failed")

        with mock.patch("ansible_runner.run", fake_run):
            ssh.run_ssh_deployment(deployment.pk)
        deployment.refresh_from_db()

        self.assertEqual(list((self.data_dir / "deployments").iterdir()), [])
        self.assertEqual(deployment.status, "failed")
        self.assertNotIn(leak["token"], deployment.log)
        self.assertNotIn("not-a-real-key", deployment.log)
        self.assertIn("[redacted]", deployment.log)

    def test_a_failed_task_fails_the_deployment_with_its_message(self) -> None:
        deployment = self.deployment("install")
        events = [
            {"event": "playbook_on_task_start", "event_data": {"task": "Copy main.py"}},
            {
                "event": "runner_on_failed",
                "event_data": {"host": "10.0.0.1", "res": {"msg": "No space left on device"}},
            },
        ]

        self.run_with(deployment, "failed", events)

        self.assertEqual(deployment.status, "failed")
        lines = deployment.log.splitlines()
        self.assertIn("TASK [Copy main.py]", lines)
        self.assertIn("failed: [10.0.0.1]: No space left on device", lines)
        self.assertEqual(lines[-1], "failed: task failed: Copy main.py: No space left on device")

    def test_ansible_failing_without_a_task_says_why(self) -> None:
        deployment = self.deployment("install")

        self.run_with(deployment, "failed")

        self.assertEqual(deployment.status, "failed")
        self.assertIn("the playbook could not be read", deployment.log.splitlines()[-1])

    def test_a_timeout_fails_the_deployment(self) -> None:
        deployment = self.deployment("install")

        self.run_with(deployment, "timeout")

        self.assertEqual(deployment.status, "failed")
        self.assertIn("did not finish within", deployment.log.splitlines()[-1])

    def test_a_stop_marks_the_agent_stopped(self) -> None:
        deployment = self.deployment("stop", agent=self.agent)

        seen = self.run_with(deployment, "successful")

        self.assertEqual(deployment.status, "succeeded")
        self.assertEqual(seen["extravars"]["agent_config"]["server_token"], "")
        self.agent.refresh_from_db()
        self.assertEqual(self.agent.status, "stopped")

    def test_an_upgrade_succeeds_once_the_agent_reports_the_target_version(self) -> None:
        deployment = self.deployment("upgrade", agent=self.agent)
        Deployment.objects.filter(pk=deployment.pk).update(target_version="9.9.9")

        def agent_comes_back(workdir: Path) -> None:
            Agent.objects.filter(pk=self.agent.pk).update(
                version="9.9.9", last_heartbeat=timezone.now(), status="upgrading"
            )

        self.run_with(deployment, "successful", during=agent_comes_back)

        self.assertEqual(deployment.status, "succeeded", deployment.log)
        self.assertEqual(deployment.log.splitlines()[-1], "agent web-1 online at version 9.9.9")
        self.agent.refresh_from_db()
        self.assertEqual(self.agent.status, "online")

    def test_an_install_names_the_agent_that_came_online(self) -> None:
        deployment = self.deployment("install")

        def agent_registers(workdir: Path) -> None:
            services.record_enrolled_agent(deployment, self.agent)  # registered with its token
            Agent.objects.filter(pk=self.agent.pk).update(last_heartbeat=timezone.now())

        self.run_with(deployment, "successful", during=agent_registers)

        self.assertEqual(deployment.status, "succeeded", deployment.log)
        self.assertEqual(deployment.agent_id, self.agent.pk)

    def test_an_agent_that_does_not_come_back_fails_the_deployment(self) -> None:
        deployment = self.deployment("start", agent=self.agent)

        self.run_with(deployment, "successful")

        self.assertEqual(deployment.status, "failed")
        self.assertIn("did not come online within", deployment.log.splitlines()[-1])

    def test_a_deployment_cancelled_before_it_ran_is_left_alone(self) -> None:
        deployment = self.deployment("install")
        services.cancel_deployment(deployment=deployment, user=self.alice)
        deployment.refresh_from_db()
        log = deployment.log

        with mock.patch("ansible_runner.run") as run:
            ssh.run_ssh_deployment(deployment.pk)

        run.assert_not_called()
        deployment.refresh_from_db()
        self.assertEqual((deployment.status, deployment.log), ("cancelled", log))

    def test_a_cancel_during_the_run_is_reported_to_ansible_runner(self) -> None:
        deployment = self.deployment("install")
        answers: list[bool] = []

        def during(workdir: Path) -> None:
            services.cancel_deployment(deployment=deployment, user=self.alice)

        def fake_run(**kw: Any) -> FakeRunner:
            answers.append(kw["cancel_callback"]())
            during(Path(kw["private_data_dir"]))
            answers.append(kw["cancel_callback"]())  # throttled: still the old answer
            kw["cancel_callback"].next_check = 0
            answers.append(kw["cancel_callback"]())
            return FakeRunner("canceled")

        with mock.patch("ansible_runner.run", fake_run):
            ssh.run_ssh_deployment(deployment.pk)

        self.assertEqual(answers, [False, False, True])
        deployment.refresh_from_db()
        self.assertEqual(deployment.status, "cancelled")
        self.assertTrue(deployment.log.endswith("cancelled by alice\n"))

    def test_a_server_without_a_key_fails_clearly(self) -> None:
        Server.objects.filter(pk=self.server.pk).update(ssh_private_key_encrypted="")
        deployment = self.deployment("install")

        with mock.patch("ansible_runner.run") as run:
            ssh.run_ssh_deployment(deployment.pk)

        run.assert_not_called()
        deployment.refresh_from_db()
        self.assertEqual(deployment.status, "failed")
        self.assertIn("has no SSH private key", deployment.log)

    def test_it_records_host_keys_on_first_use_only(self) -> None:
        line = "[10.0.0.1]:22 ssh-ed25519 AAAAfirst\n"

        def ssh_accepts(key: str):
            return lambda workdir: (workdir / "known_hosts").write_text(key)

        self.run_with(self.deployment("install"), "failed", during=ssh_accepts(line))
        self.server.refresh_from_db()
        self.assertEqual(self.server.ssh_known_hosts, line)

        seen = self.run_with(
            self.deployment("install"), "failed", during=ssh_accepts("[10.0.0.1]:22 other\n")
        )
        self.server.refresh_from_db()
        self.assertEqual(self.server.ssh_known_hosts, line)
        args = seen["inventory"]["all"]["hosts"]["10.0.0.1"]["ansible_ssh_common_args"]
        self.assertIn("StrictHostKeyChecking=yes", args)


class SshOptionsTestCase(SimpleTestCase):
    def test_first_use_accepts_and_records_a_new_key(self) -> None:
        args = shlex.split(
            ansible_io.ssh_common_args(known_hosts=Path("/x y/kh"), host_keys_recorded=False)
        )

        self.assertIn("UserKnownHostsFile=/x y/kh", args)
        self.assertIn("StrictHostKeyChecking=accept-new", args)
        self.assertIn("GlobalKnownHostsFile=/dev/null", args)
        self.assertIn("BatchMode=yes", args)
        self.assertIn(f"ConnectTimeout={ansible_io.SSH_CONNECT_TIMEOUT}", args)

    def test_recorded_keys_are_the_only_ones_accepted(self) -> None:
        args = shlex.split(
            ansible_io.ssh_common_args(known_hosts=Path("/kh"), host_keys_recorded=True)
        )

        self.assertIn("StrictHostKeyChecking=yes", args)

    def test_ansible_checks_host_keys_and_is_this_venvs(self) -> None:
        env = ansible_io.ansible_env(Path("/work/d"))

        # ansible-runner would otherwise set it to False, and Ansible would then pass
        # StrictHostKeyChecking=no ahead of ours.
        self.assertEqual(env["ANSIBLE_HOST_KEY_CHECKING"], "True")
        self.assertTrue(Path(env["PATH"].split(":")[0], "ansible-playbook").exists())
        self.assertTrue(env["ANSIBLE_LOCAL_TEMP"].startswith("/work/d/"))


class EventLinesTestCase(SimpleTestCase):
    def test_it_shows_plays_tasks_and_results_like_ansible(self) -> None:
        cases = [
            ({"event": "playbook_on_play_start", "event_data": {"play": "P"}}, ["PLAY [P]"]),
            ({"event": "playbook_on_task_start", "event_data": {"task": "Copy"}}, ["TASK [Copy]"]),
            ({"event": "runner_on_ok", "event_data": {"host": "h", "res": {}}}, ["ok: [h]"]),
            (
                {"event": "runner_on_ok", "event_data": {"host": "h", "res": {"changed": True}}},
                ["changed: [h]"],
            ),
            ({"event": "runner_on_skipped", "event_data": {"host": "h"}}, ["skipping: [h]"]),
            ({"event": "verbose", "stdout": "noise"}, []),
            ({"event": "runner_on_start", "event_data": {"host": "h"}}, []),
        ]
        for event, lines in cases:
            with self.subTest(event=event["event"]):
                self.assertEqual(ansible_io.event_lines(event), lines)

    def test_a_failure_shows_its_message_and_output(self) -> None:
        event = {
            "event": "runner_on_failed",
            "event_data": {"host": "h", "res": {"msg": "non-zero return code", "stderr": "boom"}},
        }

        self.assertEqual(
            ansible_io.event_lines(event), ["failed: [h]: non-zero return code", "  stderr: boom"]
        )

    def test_unreachable_keeps_only_what_ssh_said(self) -> None:
        msg = (
            'Task failed: Data could not be sent to remote host "h". Make sure this host can be '
            "reached over ssh: @@@@\n@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @\n"
            "Host key for h has changed and you have requested strict checking.\n"
            "Host key verification failed.\n"
        )
        event = {"event": "runner_on_unreachable", "event_data": {"host": "h", "res": {"msg": msg}}}

        self.assertEqual(
            ansible_io.event_lines(event),
            [
                "unreachable: [h]: Host key for h has changed and you have requested strict "
                "checking. Host key verification failed."
            ],
        )

    def test_the_recap_counts_hosts(self) -> None:
        event = {
            "event": "playbook_on_stats",
            "event_data": {"ok": {"h": 5}, "changed": {"h": 2}, "dark": {}, "failures": {"h": 1}},
        }

        self.assertEqual(
            ansible_io.event_lines(event), ["PLAY RECAP ok=5 changed=2 unreachable=0 failed=1"]
        )


class FailureReasonTestCase(SimpleTestCase):
    server = Server(pk=7, host="db.example", ssh_user="deploy", ssh_port=2222)

    def test_a_changed_host_key_says_so_and_how_to_reset_it(self) -> None:
        reason = ansible_io.failure_reason(
            "runner_on_unreachable", "...\nHost key verification failed.\n", self.server
        )

        self.assertIn("host key verification failed", reason)
        self.assertIn("changed since it was first recorded", reason)
        self.assertIn("/api/servers/7/forget_host_key/", reason)

    def test_an_unreachable_host_names_the_address(self) -> None:
        reason = ansible_io.failure_reason(
            "runner_on_unreachable",
            "ssh: connect to host db.example port 2222: Connection refused",
            self.server,
        )

        self.assertEqual(
            reason,
            "host unreachable: deploy@db.example:2222: "
            "ssh: connect to host db.example port 2222: Connection refused",
        )

    def test_a_refused_key_is_an_authentication_failure(self) -> None:
        reason = ansible_io.failure_reason(
            "runner_on_unreachable",
            "deploy@db.example: Permission denied (publickey).",
            self.server,
        )

        self.assertTrue(reason.startswith("SSH authentication failed for deploy@db.example:2222"))


class PlaybookTestCase(SimpleTestCase):
    """The systemd branch does not run on the test machine (no systemd): check what can be
    checked without it."""

    def test_the_playbook_parses(self) -> None:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "ansible-playbook"),
                "--syntax-check",
                "-i",
                "localhost,",
                "-e",
                '{"action": "install"}',
                str(ssh.PLAYBOOK_DIR / ssh.PLAYBOOK),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **ansible_io.ansible_env(Path(tempfile.mkdtemp()))},
        )

        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_the_unit_runs_the_agent_with_its_config_and_restarts_only_crashes(self) -> None:
        template = (ssh.PLAYBOOK_DIR / "tether-agent.service.j2").read_text()

        unit = jinja2.Template(template).render(
            agent_dir="/opt/tether-agent", agent_python="/usr/bin/python3"
        )

        self.assertIn(
            "ExecStart=/usr/bin/python3 /opt/tether-agent/main.py "
            "--config /opt/tether-agent/agent.json\n",
            unit,
        )
        self.assertIn("Restart=on-failure\n", unit)

    def test_the_supervisor_is_plain_sh(self) -> None:
        result = subprocess.run(
            ["/bin/sh", "-n", str(ssh.PLAYBOOK_DIR / "tether-agentctl")],
            capture_output=True,
            text=True,
            timeout=10,
        )

        self.assertEqual(result.returncode, 0, result.stderr)


class AsDataTestCase(SimpleTestCase):
    def test_every_string_is_marked_unsafe_and_nothing_else_changes(self) -> None:
        value = {"a": "{{ x }}", "n": 22, "list": ["s", 1, {"b": "t"}], "none": None}

        self.assertEqual(
            ansible_io.as_data(value),
            {
                "a": {"__ansible_unsafe": "{{ x }}"},
                "n": 22,
                "list": [{"__ansible_unsafe": "s"}, 1, {"b": {"__ansible_unsafe": "t"}}],
                "none": None,
            },
        )


class StaleRunDirsTestCase(BaseTestCase):
    def test_dirs_of_ended_or_unknown_deployments_go_and_active_ones_stay(self) -> None:
        data_dir = Path(tempfile.mkdtemp())
        self.enterContext(override_settings(DATA_DIR=data_dir))
        active = services.create_deployment(
            server=self.server, agent=None, kind="install", method="ssh", user=self.alice
        )
        ended = services.create_deployment(
            server=self.server, agent=self.agent, kind="upgrade", method="ssh", user=self.alice
        )
        services.finish_deployment(deployment=ended, status="failed")
        for name in (str(active.pk), str(ended.pk), "999999"):
            (data_dir / "deployments" / name).mkdir(parents=True)
            (data_dir / "deployments" / name / "ssh_key").write_text("secret")

        self.assertEqual(ssh.remove_stale_run_dirs(), 2)

        left = sorted(p.name for p in (data_dir / "deployments").iterdir())
        self.assertEqual(left, [str(active.pk)])
