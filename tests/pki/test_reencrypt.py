"""Rotating SECRET_KEY (docs/security.md): the old key as a fallback keeps every agent and SSH
key readable, `tether reencrypt` moves the values to the new key, then the fallback can go."""

from io import StringIO

from django.core.management import CommandError, call_command
from django.test import override_settings

from tether.fleet import credentials
from tether.fleet.models import Agent, Server

from ..base import BaseTestCase

NEW = "new-" + "n" * 50


class ReencryptTestCase(BaseTestCase):
    def secret(self) -> str:
        return credentials.decrypt(Agent.objects.get(pk=self.agent.pk).secret_key_encrypted)

    def test_a_new_key_with_the_old_as_fallback_then_reencrypt(self) -> None:
        from django.conf import settings

        old = settings.SECRET_KEY
        before = self.secret()
        Server.objects.filter(pk=self.server.pk).update(
            ssh_private_key_encrypted=credentials.encrypt("-----BEGIN KEY-----")
        )

        with override_settings(SECRET_KEY=NEW), self.assertRaises(ValueError):
            self.secret()  # without the fallback: locked out
        with override_settings(SECRET_KEY=NEW, SECRET_KEY_FALLBACKS=[old]):
            self.assertEqual(self.secret(), before)  # still served meanwhile
            out = StringIO()
            call_command("reencrypt", stdout=out)
            self.assertIn("fleet.Agent.secret_key_encrypted: 2 re-encrypted", out.getvalue())
        with override_settings(SECRET_KEY=NEW):  # the fallback is no longer needed
            self.assertEqual(self.secret(), before)
            server = Server.objects.get(pk=self.server.pk)
            key = credentials.decrypt(server.ssh_private_key_encrypted)
            self.assertEqual(key, "-----BEGIN KEY-----")

    def test_values_under_an_unknown_key_are_reported_not_lost(self) -> None:
        with override_settings(SECRET_KEY=NEW), self.assertRaises(CommandError) as raised:
            call_command("reencrypt", stdout=StringIO())
        self.assertIn("TETHER_SECRET_KEY_FALLBACKS", str(raised.exception))
        self.assertTrue(self.secret())  # untouched, still readable under the old key
