"""Rolling upgrades: waves of upgrades, stopped at the first wave past max_errors."""

from django.utils import timezone

from tether.accounts.models import AuditEvent
from tether.deploy import services
from tether.deploy.models import Deployment, Rollout
from tether.fleet import services as fleet_services
from tether.fleet.agent_files import agent_version
from tether.fleet.models import Agent

from ..base import BaseTestCase

D = Deployment.Status


class RolloutTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.agents = [self.agent]
        for n in range(2, 6):
            self.agents.append(
                fleet_services.register_agent(server=self.server, hostname=f"web-{n}").agent
            )
        Agent.objects.filter(pk__in=[a.pk for a in self.agents]).update(
            status="online", last_heartbeat=timezone.now(), signs_requests=True
        )

    def start(self, expect: int = 201, **body: object) -> dict:
        body.setdefault("targets", {"all": True})
        response = self.post_json("/api/rollouts/", body)
        self.assertEqual(response.status_code, expect, response.content)
        return response.json()

    def deployments(self, rollout: dict) -> list[Deployment]:
        return list(Deployment.objects.filter(rollout_id=rollout["id"]).order_by("id"))

    def end(self, deployment: Deployment, status: str) -> None:
        with self.captureOnCommitCallbacks(execute=True):
            services.finish_deployment(deployment=deployment, status=status, line="done")

    def read(self, rollout: dict) -> dict:
        return self.client.get(f"/api/rollouts/{rollout['id']}/").json()


class WavesTestCase(RolloutTestCase):
    def test_it_upgrades_one_wave_at_a_time(self) -> None:
        rollout = self.start(batch_size=2)

        first = self.deployments(rollout)
        self.assertEqual(len(first), 2)
        self.assertEqual({d.kind for d in first}, {"upgrade"})
        self.assertEqual({d.method for d in first}, {"agent"})
        self.assertEqual(rollout["wave"], 1)
        self.assertEqual(rollout["counts"]["pending"], 3)
        self.assertEqual(rollout["target_version"], agent_version())
        self.assertTrue(AuditEvent.objects.filter(action="rollout.start"))

        self.end(first[0], D.SUCCEEDED)
        self.assertEqual(len(self.deployments(rollout)), 2)  # the wave is not over yet
        self.end(first[1], D.SUCCEEDED)

        self.assertEqual(len(self.deployments(rollout)), 4)
        self.assertEqual(self.read(rollout)["wave"], 2)

    def test_it_succeeds_when_every_wave_did(self) -> None:
        rollout = self.start(batch_size=3)
        while pending := [d for d in self.deployments(rollout) if d.status not in services.FINAL]:
            for deployment in pending:
                self.end(deployment, D.SUCCEEDED)

        detail = self.read(rollout)
        self.assertEqual(detail["status"], "succeeded")
        self.assertEqual(detail["counts"]["succeeded"], 5)
        self.assertEqual(detail["not_started"], [])

    def test_the_first_failing_wave_stops_it(self) -> None:
        rollout = self.start(batch_size=2)
        canary = self.deployments(rollout)

        self.end(canary[0], D.SUCCEEDED)
        self.end(canary[1], D.FAILED)

        detail = self.read(rollout)
        self.assertEqual(detail["status"], "failed")
        self.assertIn("wave 1: 1 upgrade(s) failed", detail["reason"])
        self.assertEqual(len(self.deployments(rollout)), 2)
        self.assertEqual(
            [row["hostname"] for row in detail["not_started"]], ["web-3", "web-4", "web-5"]
        )

    def test_max_errors_lets_waves_go_on_until_it_is_exceeded(self) -> None:
        rollout = self.start(batch_size=2, max_errors=1)
        first = self.deployments(rollout)
        self.end(first[0], D.FAILED)
        self.end(first[1], D.SUCCEEDED)
        second = self.deployments(rollout)[2:]
        self.assertEqual(len(second), 2)

        self.end(second[0], D.FAILED)
        self.end(second[1], D.SUCCEEDED)

        detail = self.read(rollout)
        self.assertEqual(detail["status"], "failed")
        self.assertEqual(len(detail["not_started"]), 1)

    def test_an_upgrade_that_is_refused_fails_its_wave(self) -> None:
        Agent.objects.filter(pk=self.agents[0].pk).update(status="offline", last_heartbeat=None)
        rollout = self.start(batch_size=1, targets={"agents": ["web-1", "web-2"]})

        detail = self.read(rollout)
        self.assertEqual(detail["status"], "failed")
        (refused,) = self.deployments(rollout)
        self.assertEqual((refused.status, refused.agent_id), (D.FAILED, self.agents[0].pk))
        self.assertIn("no SSH private key", refused.log)
        self.assertEqual([row["hostname"] for row in detail["not_started"]], ["web-2"])


class BusyAgentTestCase(RolloutTestCase):
    def test_an_agent_busy_with_another_deployment_is_left_to_it(self) -> None:
        manual = self.post_json(f"/api/agents/{self.agents[0].pk}/stop/", {}).json()

        rollout = self.start(batch_size=1, targets={"agents": ["web-1"]})

        stop = Deployment.objects.get(pk=manual["deployment_id"])
        self.assertIn(stop.status, services.ACTIVE)  # not superseded by the rollout
        (refused,) = self.deployments(rollout)
        self.assertEqual(refused.status, D.FAILED)
        self.assertIn(f"another deployment of web-1 is running (#{stop.pk})", refused.log)
        self.assertEqual(self.read(rollout)["status"], "failed")


class CancelRolloutTestCase(RolloutTestCase):
    def test_cancel_stops_further_waves_and_the_running_upgrades(self) -> None:
        rollout = self.start(batch_size=2)

        response = self.post_json(f"/api/rollouts/{rollout['id']}/cancel/", {})

        self.assertEqual(response.status_code, 202, response.content)
        self.assertEqual(response.json()["status"], "cancelled")
        self.assertEqual({d.status for d in self.deployments(rollout)}, {D.CANCELLED})
        self.assertEqual(len(self.deployments(rollout)), 2)
        self.assertError(self.post_json(f"/api/rollouts/{rollout['id']}/cancel/", {}), 409)


class RolloutInputTestCase(RolloutTestCase):
    def test_it_refuses_bad_input_and_starts_nothing(self) -> None:
        for body in (
            {"batch_size": 0},
            {"batch_size": "two"},
            {"batch_size": 2, "max_errors": -1},
            {"batch_size": 2, "targets": {}},
            {"batch_size": 2, "targets": {"tags": ["nope"]}},
            {"batch_size": 2, "colour": "red"},
        ):
            with self.subTest(body=body):
                self.assertError(
                    self.post_json("/api/rollouts/", {"targets": {"all": True}, **body}), 400
                )
        self.assertFalse(Rollout.objects.exists())
        self.assertFalse(Deployment.objects.exists())

    def test_another_users_agents_and_rollouts_are_not_found(self) -> None:
        body = {"batch_size": 1, "targets": {"agents": [self.bob_agent.pk]}}
        self.assertError(self.post_json("/api/rollouts/", body), 404)
        self.assertFalse(Deployment.objects.exists())

        rollout = self.start(batch_size=1)
        bob = self.client_for(self.bob)
        self.assertError(bob.get(f"/api/rollouts/{rollout['id']}/"), 404)
        self.assertError(bob.post(f"/api/rollouts/{rollout['id']}/cancel/"), 404)
        self.assertEqual(bob.get("/api/rollouts/").json()["results"], [])
