"""Agents are known by a machine identity, not a hostname (issue 13, row 4): two hosts with one
server token and one hostname were taking the identity from each other every ~25 s, and each
takeover marked the other's running command lost."""

from rest_framework.test import APIClient

from tether.commands import services as command_services
from tether.commands.models import Command
from tether.fleet import credentials, heartbeats
from tether.fleet.models import Agent

from ..base import BaseTestCase

MACHINE = "a" * 32
FIRST, SECOND = "1" * 32, "2" * 32


class MachineIdentityTestCase(BaseTestCase):
    def register(self, machine_id: str = MACHINE, instance_id: str = FIRST, **fields):
        body = {
            "server_token": self.server_token,
            "hostname": "web-9",
            "version": "2.0.0",
            "signing": "hmac-sha256",
            "machine_id": machine_id,
            "instance_id": instance_id,
            **fields,
        }
        return self.post_json("/api/agents/register/", body, APIClient())

    def online(self, agent_id: int) -> None:
        agent = Agent.objects.get(pk=agent_id)
        heartbeats.sign_of_life(agent=agent, version=None, rpc_port=None, address=None)
        heartbeats.flush()

    def test_two_hosts_with_one_hostname_are_two_agents(self) -> None:
        one = self.register(machine_id="b" * 32).json()
        two = self.register(machine_id="c" * 32).json()
        self.online(one["agent_id"])

        self.assertNotEqual(one["agent_id"], two["agent_id"])
        # Neither took the other's credentials: both tokens still name their agent.
        for answer in (one, two):
            token_hash = credentials.hash_agent_token(answer["token"])
            self.assertEqual(Agent.objects.get(token_hash=token_hash).pk, answer["agent_id"])
        self.assertEqual(Agent.objects.filter(hostname="web-9").count(), 2)

    def test_a_clone_is_refused_while_the_agent_it_copies_is_online(self) -> None:
        first = self.register().json()
        self.online(first["agent_id"])
        command = self.queue(agent=Agent.objects.get(pk=first["agent_id"]))
        command_services.claim_commands(agent=Agent.objects.get(pk=first["agent_id"]))
        command_services.record_progress(
            agent=Agent.objects.get(pk=first["agent_id"]), command_id=command.pk, chunks=[]
        )

        clone = self.register(instance_id=SECOND)

        error = self.assertError(clone, 409, "identity_in_use")
        self.assertIn("clone", error["message"])
        agent = Agent.objects.get(pk=first["agent_id"])
        self.assertEqual(agent.instance_id, FIRST)
        command.refresh_from_db()
        self.assertEqual(command.status, Command.Status.RUNNING)  # not marked lost

    def test_the_same_install_registering_again_keeps_what_it_runs(self) -> None:
        first = self.register().json()
        agent = Agent.objects.get(pk=first["agent_id"])
        self.online(agent.pk)
        command = self.queue(agent=agent)
        command_services.claim_commands(agent=agent)
        command_services.record_progress(agent=agent, command_id=command.pk, chunks=[])

        again = self.register()

        self.assertEqual(again.status_code, 201, again.content)
        self.assertEqual(again.json()["agent_id"], agent.pk)
        self.assertNotEqual(again.json()["token"], first["token"])  # rotated
        command.refresh_from_db()
        self.assertEqual(command.status, Command.Status.RUNNING)

    def test_a_new_install_takes_over_an_offline_agent(self) -> None:
        first = self.register().json()
        agent = Agent.objects.get(pk=first["agent_id"])
        command = self.queue(agent=agent)
        command_services.claim_commands(agent=agent)
        command_services.record_progress(agent=agent, command_id=command.pk, chunks=[])
        Agent.objects.filter(pk=agent.pk).update(status=Agent.Status.OFFLINE)

        takeover = self.register(instance_id=SECOND)

        self.assertEqual(takeover.status_code, 201, takeover.content)
        self.assertEqual(takeover.json()["agent_id"], agent.pk)
        command.refresh_from_db()
        self.assertEqual(command.status, Command.Status.LOST)  # the old install is gone

    def test_an_agent_known_by_hostname_is_adopted_by_its_machine_identity(self) -> None:
        old = self.register(machine_id="", instance_id="").json()  # an earlier release

        upgraded = self.register()

        self.assertEqual(upgraded.json()["agent_id"], old["agent_id"])
        self.assertEqual(Agent.objects.get(pk=old["agent_id"]).machine_id, MACHINE)

    def test_an_online_agent_known_by_hostname_is_not_adopted_by_another_host(self) -> None:
        old = self.register(machine_id="", instance_id="").json()
        self.online(old["agent_id"])

        other = self.register(machine_id="d" * 32)

        self.assertError(other, 409, "identity_in_use")
        self.assertEqual(Agent.objects.get(pk=old["agent_id"]).machine_id, "")

    def test_a_machine_id_without_an_instance_id_is_refused(self) -> None:
        # Else a blank instance would match nothing and everything.
        self.assertError(self.register(instance_id=""), 400, "invalid")

    def test_agents_of_the_original_dialect_keep_their_hostname_identity(self) -> None:
        body = {"server_token": self.server_token, "hostname": "web-1", "version": "1.0"}
        response = self.post_json("/api/agents/register/", body, APIClient())

        self.assertEqual(response.json()["agent_id"], self.agent.pk)

    def test_malformed_identities_are_refused(self) -> None:
        for bad in ("short", "x" * 65, "-oProxyCommand=x" * 2, "a b" * 10):
            with self.subTest(bad=bad):
                response = self.register(machine_id=bad)
                self.assertError(response, 400, "invalid")
        self.assertFalse(Agent.objects.filter(hostname="web-9").exists())
