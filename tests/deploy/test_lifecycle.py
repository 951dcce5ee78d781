"""Upgrade, stop, start and install requests: method choice, superseding, ownership, the
internal command an agent carries out, and how its outcome ends the deployment."""

from datetime import timedelta
from typing import Any

from django.utils import timezone
from django_tasks_db.models import DBTaskResult

from tether.accounts.models import AuditEvent
from tether.commands.models import Command
from tether.deploy import services
from tether.deploy.models import Deployment
from tether.fleet import credentials
from tether.fleet import services as fleet_services
from tether.fleet.agent_files import agent_version
from tether.fleet.models import Agent

from ..base import BaseTestCase

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


class LifecycleTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.make_online()

    def make_online(self, agent: Agent | None = None, signs: bool = True) -> None:
        Agent.objects.filter(pk=(agent or self.agent).pk).update(
            status="online", last_heartbeat=timezone.now(), signs_requests=signs
        )
        self.agent.refresh_from_db()

    def make_offline(self) -> None:
        Agent.objects.filter(pk=self.agent.pk).update(
            status="offline", last_heartbeat=timezone.now() - timedelta(hours=1)
        )

    def give_ssh_key(self) -> None:
        self.patch_json(f"/api/servers/{self.server.pk}/", {"ssh_private_key": KEY})

    def lifecycle(self, action: str, body: Any = None, agent: Agent | None = None) -> Any:
        return self.post_json(f"/api/agents/{(agent or self.agent).pk}/{action}/", body or {})

    def internal_command(self, deployment_id: int) -> Command:
        return Command.objects.get(deployment_id=deployment_id)

    def report(self, command: Command, **body: Any) -> None:
        """The agent's result, sent unsigned (this test client cannot sign)."""
        Agent.objects.filter(pk=self.agent.pk).update(signs_requests=False)
        response = self.result(command.pk, **body)
        self.assertEqual(response.status_code, 200, response.content)

    def test_an_online_agent_is_upgraded_through_an_internal_command(self) -> None:
        response = self.lifecycle("upgrade")

        self.assertEqual(response.status_code, 202, response.content)
        self.assertEqual(response.json()["method"], "agent")
        deployment = Deployment.objects.get(pk=response.json()["deployment_id"])
        self.assertEqual((deployment.kind, deployment.status), ("upgrade", "running"))
        self.assertEqual(deployment.target_version, agent_version())
        self.assertIsNotNone(deployment.deadline)
        delivered = self.deliver()
        self.assertEqual([c.command for c in delivered], ["upgrade"])
        from tether.commands.services import as_delivered

        wire = as_delivered(delivered[0])
        self.assertEqual((wire["kind"], wire["deployment_id"]), ("internal", deployment.pk))
        self.agent.refresh_from_db()
        self.assertEqual(self.agent.status, "upgrading")
        self.assertTrue(AuditEvent.objects.filter(action="deployment.upgrade").exists())

    def test_the_upgrade_succeeds_when_the_agent_comes_back_at_the_new_version(self) -> None:
        deployment_id = self.lifecycle("upgrade").json()["deployment_id"]
        command = self.internal_command(deployment_id)
        self.deliver()
        self.report(command, status="succeeded", exit_code=0)
        self.assertEqual(Deployment.objects.get(pk=deployment_id).status, "running")

        fleet_services.record_heartbeat(agent=self.agent, version=agent_version())

        deployment = Deployment.objects.get(pk=deployment_id)
        self.assertEqual(deployment.status, "succeeded")
        self.assertIn(f"agent online at version {agent_version()}", deployment.log)
        self.agent.refresh_from_db()
        self.assertEqual(self.agent.status, "online")

    def test_a_failed_internal_command_fails_the_deployment_with_its_reason(self) -> None:
        deployment_id = self.lifecycle("upgrade").json()["deployment_id"]
        command = self.internal_command(deployment_id)
        self.deliver()

        self.report(command, status="failed", error="--self-test of the new file failed")

        deployment = Deployment.objects.get(pk=deployment_id)
        self.assertEqual(deployment.status, "failed")
        self.assertIn("--self-test of the new file failed", deployment.log)
        self.agent.refresh_from_db()
        self.assertEqual(self.agent.status, "online")

    def test_a_second_upgrade_cancels_the_first_and_its_command(self) -> None:
        first = self.lifecycle("upgrade").json()["deployment_id"]
        self.deliver()

        second = self.lifecycle("upgrade").json()["deployment_id"]

        old = Deployment.objects.get(pk=first)
        self.assertEqual(old.status, "cancelled")
        self.assertIn("superseded by a new upgrade from alice", old.log)
        self.assertTrue(self.internal_command(first).cancel_requested)
        self.assertEqual(Deployment.objects.get(pk=second).status, "running")
        active = Deployment.objects.filter(agent=self.agent, status__in=["queued", "running"])
        self.assertEqual(active.count(), 1)

    def test_cancelling_a_deployment_cancels_the_command_carrying_it_out(self) -> None:
        deployment_id = self.lifecycle("stop").json()["deployment_id"]
        self.deliver()

        response = self.post_json(f"/api/deployments/{deployment_id}/cancel/", {})

        self.assertEqual(response.status_code, 202, response.content)
        self.assertTrue(self.internal_command(deployment_id).cancel_requested)
        self.assertEqual(self.deliver(), [])  # never handed out again

    def test_an_agent_can_fail_its_own_deployment_but_not_succeed_it(self) -> None:
        deployment_id = self.lifecycle("upgrade").json()["deployment_id"]
        Agent.objects.filter(pk=self.agent.pk).update(signs_requests=False)
        url = f"/api/agents/deployment/{deployment_id}/progress/"

        self.assertError(self.agent_post(url, {"log": "x", "status": "succeeded"}), 400)
        response = self.agent_post(url, {"log": "back on version 1.0.0", "status": "failed"})

        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response.json()["deployment_status"], "failed")
        deployment = Deployment.objects.get(pk=deployment_id)
        self.assertIn("back on version 1.0.0", deployment.log)
        self.assertEqual(self.internal_command(deployment_id).status, "cancelled")

    def test_stop_ends_with_the_agent_stopped_and_a_later_poll_brings_it_back(self) -> None:
        deployment_id = self.lifecycle("stop").json()["deployment_id"]
        command = self.internal_command(deployment_id)
        self.deliver()

        self.report(command, status="succeeded", exit_code=0)

        self.assertEqual(Deployment.objects.get(pk=deployment_id).status, "succeeded")
        self.agent.refresh_from_db()
        self.assertEqual(self.agent.status, "stopped")
        fleet_services.mark_offline_agents()
        self.agent.refresh_from_db()
        self.assertEqual(self.agent.status, "stopped")  # a stopped agent is not "offline"
        fleet_services.record_heartbeat(agent=self.agent)
        self.assertEqual(Agent.objects.get(pk=self.agent.pk).status, "online")

    def test_an_offline_agent_needs_ssh_credentials(self) -> None:
        self.make_offline()

        error = self.assertError(self.lifecycle("upgrade"), 409, "no_ssh_credentials")

        self.assertIn("ssh_private_key", error["message"])
        self.assertFalse(Deployment.objects.exists())

    def test_an_offline_agent_is_upgraded_over_ssh_by_a_background_task(self) -> None:
        self.make_offline()
        self.give_ssh_key()

        with self.captureOnCommitCallbacks(execute=True):
            response = self.lifecycle("upgrade")

        self.assertEqual(response.status_code, 202, response.content)
        self.assertEqual(response.json()["method"], "ssh")
        task = DBTaskResult.objects.get()
        self.assertEqual(task.args_kwargs["args"], [response.json()["deployment_id"]])
        self.assertFalse(Command.objects.filter(kind="internal").exists())

    def test_a_legacy_agent_is_upgraded_over_ssh_even_when_online(self) -> None:
        self.make_online(signs=False)
        self.give_ssh_key()

        self.assertEqual(self.lifecycle("upgrade").json()["method"], "ssh")

    def test_start_always_goes_over_ssh_and_refuses_an_online_agent(self) -> None:
        self.assertError(self.lifecycle("start"), 409, "already_online")
        Agent.objects.filter(pk=self.agent.pk).update(status="stopped")
        self.give_ssh_key()

        response = self.lifecycle("start")

        self.assertEqual(response.status_code, 202, response.content)
        self.assertEqual(response.json()["method"], "ssh")

    def test_install_creates_an_ssh_deployment_without_an_agent(self) -> None:
        self.give_ssh_key()

        with self.settings(PUBLIC_URL="https://tether.example:8443"):
            response = self.post_json(f"/api/servers/{self.server.pk}/install/", {})

        self.assertEqual(response.status_code, 202, response.content)
        deployment = Deployment.objects.get(pk=response.json()["deployment_id"])
        self.assertEqual((deployment.kind, deployment.method), ("install", "ssh"))
        self.assertIsNone(deployment.agent)
        # The public URL, never the request's Host header (the test client's "testserver").
        self.assertEqual(deployment.server_url, "https://tether.example:8443")

    def test_another_users_agent_or_server_answers_404_and_changes_nothing(self) -> None:
        for action in ("upgrade", "stop", "start"):
            with self.subTest(action=action):
                self.assertError(self.lifecycle(action, agent=self.bob_agent), 404)
        self.assertError(self.post_json(f"/api/servers/{self.bob_server.pk}/install/", {}), 404)
        self.assertFalse(Deployment.objects.exists())
        self.assertFalse(Command.objects.exists())

    def test_unknown_fields_are_refused(self) -> None:
        self.assertError(self.lifecycle("upgrade", {"version": "6.6.6"}), 400)
        self.assertError(self.lifecycle("stop", ["x"]), 400)
        self.assertFalse(Deployment.objects.exists())

    def test_a_deployment_past_its_deadline_fails_and_its_command_is_cancelled(self) -> None:
        deployment_id = self.lifecycle("upgrade").json()["deployment_id"]
        Deployment.objects.filter(pk=deployment_id).update(
            deadline=timezone.now() - timedelta(seconds=1)
        )

        self.assertEqual(services.expire_deployments(), 1)

        deployment = Deployment.objects.get(pk=deployment_id)
        self.assertEqual(deployment.status, "failed")
        self.assertIn(f"waited for the agent at version {agent_version()}", deployment.log)
        self.assertEqual(self.internal_command(deployment_id).status, "cancelled")
        self.agent.refresh_from_db()
        self.assertEqual(self.agent.status, "online")


class ManifestTestCase(BaseTestCase):
    def test_the_manifest_is_signed_with_the_asking_agents_secret(self) -> None:
        response = self.agent_client.get("/api/agents/files/manifest.json/")

        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        manifest = body["manifest"]
        self.assertEqual(manifest["agent_id"], self.agent.pk)
        self.assertEqual(manifest["version"], agent_version())
        self.assertEqual(set(manifest["files"]), {"main.py", "requirements.txt"})
        secret = credentials.decrypt(self.agent.secret_key_encrypted)
        self.assertEqual(body["signature"], credentials.sign_document(secret, manifest))

    def test_the_manifest_needs_an_agent_token(self) -> None:
        self.client.force_authenticate(None)
        self.assertError(self.client.get("/api/agents/files/manifest.json/"), 401)


class EnrollmentTokenTestCase(BaseTestCase):
    def test_it_registers_while_its_deployment_is_active_and_never_after(self) -> None:
        deployment = services.create_deployment(
            server=self.server, agent=None, kind="install", method="ssh", user=self.alice
        )
        token = services.new_enrollment_token(deployment)
        body = {"server_token": token, "hostname": "new-host"}

        response = self.post_json("/api/agents/register/", body)

        self.assertEqual(response.status_code, 201, response.content)
        self.assertEqual(response.json()["server_id"], self.server.pk)
        self.assertEqual(Deployment.objects.get(pk=deployment.pk).agent.hostname, "new-host")
        services.finish_deployment(deployment=deployment, status="succeeded")
        self.assertError(self.post_json("/api/agents/register/", body), 401)
        self.assertNotIn(token, Deployment.objects.get(pk=deployment.pk).enroll_token_hash)
