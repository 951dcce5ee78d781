"""The built-in CA and agent certificates: issue, deliver (encrypted), revoke, renew, and the
update_certificate / check_status endpoints' answers to bad input."""

import json
import stat
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID
from django.test import override_settings
from django.utils import timezone

from tether.commands.models import Command
from tether.commands.services import as_delivered
from tether.fleet import services as fleet_services
from tether.fleet.models import Agent
from tether.pki import ca, services
from tether.pki.models import Certificate

from ..base import BaseTestCase


class CertificateBase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        Agent.objects.filter(pk=self.agent.pk).update(
            signs_requests=True, rpc_port=7443, address="10.0.0.9"
        )
        self.agent.refresh_from_db()

    def delivery(self) -> Command:
        return Command.objects.get(agent=self.agent, command="update_certificate", status="queued")


class CertificateTestCase(CertificateBase):
    def test_the_ca_is_made_once_with_a_private_key_only_its_owner_reads(self) -> None:
        authority = ca.authority()
        key_path = Path(ca._ca_paths()[1])

        self.assertEqual(stat.S_IMODE(key_path.stat().st_mode), 0o600)
        self.assertTrue(
            authority.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        )
        ca.authority.cache_clear()
        self.assertEqual(ca.authority().certificate, authority.certificate)

    def test_a_certificate_names_the_agent_and_its_addresses(self) -> None:
        certificate = services.issue_certificate(agent=self.agent, user=self.alice)

        payload = as_delivered(self.delivery())["payload"]
        issued = x509.load_pem_x509_certificate(payload["certificate"].encode())
        self.assertEqual(
            issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, str(self.agent.pk)
        )
        alt = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("web-1", alt.get_values_for_type(x509.DNSName))
        self.assertIn("10.0.0.9", [str(a) for a in alt.get_values_for_type(x509.IPAddress)])
        self.assertEqual(format(issued.serial_number, "x"), certificate.serial)
        self.assertIn("PRIVATE KEY", payload["private_key"])
        self.assertNotIn("ca_certificate", payload)  # this server does not serve TLS itself

    def test_the_key_is_stored_encrypted(self) -> None:
        services.issue_certificate(agent=self.agent, user=self.alice)

        stored = self.delivery().payload_encrypted
        self.assertNotIn("PRIVATE KEY", stored)
        self.assertNotIn("BEGIN", stored)

    def test_a_new_certificate_revokes_the_old_and_cancels_its_pending_delivery(self) -> None:
        old = services.issue_certificate(agent=self.agent, user=self.alice)
        old_delivery = self.delivery()

        new = services.issue_certificate(agent=self.agent, user=self.alice)

        old.refresh_from_db()
        self.assertIsNotNone(old.revoked_at)
        self.assertEqual(services.rpc_target(self.agent).good_serials, {new.serial})
        old_delivery.refresh_from_db()
        self.assertEqual(old_delivery.status, "cancelled")
        self.assertEqual(services.current_certificate(self.agent), new)

    def test_a_signing_agent_with_an_rpc_port_gets_a_certificate_when_it_registers(self) -> None:
        response = self.post_json(
            "/api/agents/register/",
            {
                "server_token": self.server_token,
                "hostname": "rpc-host",
                "rpc_port": 7443,
                "signing": "hmac-sha256",
            },
        )

        self.assertEqual(response.status_code, 201, response.content)
        self.assertIsNone(response.json()["ca_certificate"])  # nothing to pin: plain HTTP
        agent = Agent.objects.get(hostname="rpc-host")
        self.assertEqual(agent.certificates.count(), 1)
        self.assertTrue(Command.objects.filter(agent=agent, command="update_certificate").exists())

    @override_settings(SERVES_BUILTIN_TLS=True)
    def test_a_server_serving_the_ca_s_certificate_hands_agents_the_ca_to_pin(self) -> None:
        body = {
            "server_token": self.server_token,
            "hostname": "pinned",
            "rpc_port": 7443,
            "signing": "hmac-sha256",
        }

        response = self.post_json("/api/agents/register/", body)

        self.assertEqual(response.json()["ca_certificate"], ca.authority().pem)
        delivery = Command.objects.get(agent__hostname="pinned", command="update_certificate")
        self.assertEqual(as_delivered(delivery)["payload"]["ca_certificate"], ca.authority().pem)

    def test_an_agent_without_an_rpc_port_gets_none(self) -> None:
        body = {"server_token": self.server_token, "hostname": "plain", "signing": "hmac-sha256"}

        self.assertEqual(self.post_json("/api/agents/register/", body).status_code, 201)

        self.assertFalse(Certificate.objects.filter(agent__hostname="plain").exists())

    def test_a_signing_agent_that_registers_again_gets_a_new_certificate(self) -> None:
        body = {
            "server_token": self.server_token,
            "hostname": "again",
            "rpc_port": 7443,
            "signing": "hmac-sha256",
        }
        self.post_json("/api/agents/register/", body)
        first = services.current_certificate(Agent.objects.get(hostname="again"))

        self.post_json("/api/agents/register/", body)

        second = services.current_certificate(Agent.objects.get(hostname="again"))
        self.assertNotEqual(first.serial, second.serial)

    def test_a_late_success_of_a_superseded_delivery_proves_nothing(self) -> None:
        services.issue_certificate(agent=self.agent, user=self.alice)
        old = self.delivery()
        self.deliver()  # handed out: a new issue asks the agent to cancel it
        new_certificate = services.issue_certificate(agent=self.agent, user=self.alice)
        Agent.objects.filter(pk=self.agent.pk).update(signs_requests=False)  # unsigned client

        self.assertEqual(self.result(old.pk, status="succeeded", exit_code=0).status_code, 200)

        new_certificate.refresh_from_db()
        self.assertIsNone(new_certificate.installed_at)
        old.refresh_from_db()
        self.assertEqual(old.payload_encrypted, "")  # the key leaves the database

    def test_a_payload_that_no_longer_decrypts_is_delivered_empty(self) -> None:
        services.issue_certificate(agent=self.agent, user=self.alice)
        Command.objects.filter(command="update_certificate").update(payload_encrypted="garbage")

        self.assertIsNone(as_delivered(self.delivery())["payload"])

    def test_a_successful_delivery_marks_the_certificate_installed(self) -> None:
        certificate = services.issue_certificate(agent=self.agent, user=self.alice)
        command = self.delivery()
        self.deliver()
        Agent.objects.filter(pk=self.agent.pk).update(signs_requests=False)  # unsigned client

        response = self.result(command.pk, status="succeeded", exit_code=0)

        self.assertEqual(response.status_code, 200, response.content)
        certificate.refresh_from_db()
        self.assertIsNotNone(certificate.installed_at)

    def test_certificates_near_expiry_are_renewed(self) -> None:
        old = services.issue_certificate(agent=self.agent, user=self.alice)
        Certificate.objects.filter(pk=old.pk).update(not_after=timezone.now() + timedelta(days=29))

        self.assertEqual(services.renew_expiring(), 1)

        self.assertNotEqual(services.current_certificate(self.agent).serial, old.serial)
        self.assertEqual(services.renew_expiring(), 0)

    @override_settings(CA_CERT_PATH="", CA_KEY_PATH="")
    def test_an_operators_ca_is_used_when_given(self) -> None:
        other = self.settings(DATA_DIR=Path(self.enterContext(_tmpdir())))
        with other:
            ca.authority.cache_clear()
            made = ca.authority()
            cert_path, key_path = ca._ca_paths()
        ca.authority.cache_clear()
        with self.settings(CA_CERT_PATH=str(cert_path), CA_KEY_PATH=str(key_path)):
            self.assertEqual(ca.authority().certificate, made.certificate)
        ca.authority.cache_clear()


class UpdateCertificateApiTestCase(CertificateBase):
    def update(self, body: object, agent: Agent | None = None):
        return self.post_json(f"/api/agents/{(agent or self.agent).pk}/update_certificate/", body)

    def test_regenerate_answers_with_the_new_certificate(self) -> None:
        response = self.update({"regenerate": True})

        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        current = services.current_certificate(self.agent)
        self.assertEqual(body["serial"], current.serial)
        self.assertEqual(body["fingerprint_sha256"], current.fingerprint_sha256)
        self.assertTrue(body["pending"])
        self.assertTrue(body["verify_ssl"])
        self.assertIsNotNone(body["not_after"])

    def test_verify_ssl_is_stored_and_sent_in_the_agents_config(self) -> None:
        response = self.update({"verify_ssl": False})

        self.assertEqual(response.status_code, 200, response.content)
        self.agent.refresh_from_db()
        self.assertFalse(self.agent.verify_ssl)
        self.assertFalse(fleet_services.agent_config(self.agent)["verify_ssl"])
        self.assertEqual(Command.objects.filter(command="update_certificate").count(), 0)

    def test_bad_input_is_refused_and_changes_nothing(self) -> None:
        for body in ({"regenerate": "yes"}, {"verify_ssl": 1}, {"serial": "x"}, ["x"]):
            with self.subTest(body=body):
                self.assertError(self.update(body), 400)
        self.assertFalse(Certificate.objects.exists())
        self.agent.refresh_from_db()
        self.assertTrue(self.agent.verify_ssl)

    def test_another_users_agent_answers_404(self) -> None:
        self.assertError(self.update({"regenerate": True}, agent=self.bob_agent), 404)
        self.assertFalse(Certificate.objects.exists())

    def test_an_agent_of_the_original_dialect_has_nothing_to_certify(self) -> None:
        Agent.objects.filter(pk=self.agent.pk).update(signs_requests=False)

        self.assertError(self.update({"regenerate": True}), 409, "legacy_agent")


class CheckStatusApiTestCase(CertificateBase):
    def check(self, body: object = None, agent: Agent | None = None):
        url = f"/api/agents/{(agent or self.agent).pk}/check_status/"
        return self.client.post(url, json.dumps(body or {}), content_type="application/json")

    def test_another_users_agent_answers_404(self) -> None:
        self.assertError(self.check(agent=self.bob_agent), 404)

    def test_fields_are_refused(self) -> None:
        self.assertError(self.check({"timeout": 1}), 400)

    def test_it_needs_authentication(self) -> None:
        self.client.force_authenticate(None)
        self.assertError(self.check(), 401)

    def test_an_agent_without_an_endpoint_is_reported_unreachable_and_left_as_it_is(self) -> None:
        Agent.objects.filter(pk=self.agent.pk).update(
            status="online", last_heartbeat=timezone.now()
        )

        response = self.check()

        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        self.assertFalse(body["reachable"])
        self.assertIn("no RPC endpoint", body["error"])
        self.assertEqual(body["status"], "online")
        self.assertEqual(
            set(body),
            {"reachable", "status", "latency_ms", "version", "running", "checked_at", "error"},
        )


def _tmpdir():
    import tempfile

    return tempfile.TemporaryDirectory()
