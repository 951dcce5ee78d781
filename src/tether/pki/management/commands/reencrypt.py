"""`tether reencrypt`: move every encrypted value to the current SECRET_KEY, the last step of
rotating it (docs/security.md). Lives in pki, the lowest app that sees every table holding
key material (agents' secrets, servers' SSH keys, certificate payloads of queued commands)."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import models, transaction

from tether.commands.models import Command as QueuedCommand
from tether.fleet import credentials
from tether.fleet.models import Agent, Server

# (model, field): every column credentials.encrypt writes.
ENCRYPTED: list[tuple[type[models.Model], str]] = [
    (Agent, "secret_key_encrypted"),
    (Server, "ssh_private_key_encrypted"),
    (QueuedCommand, "payload_encrypted"),
]
BATCH = 500


class Command(BaseCommand):
    help = "Re-encrypt agent secrets, SSH keys and command payloads under TETHER_SECRET_KEY."

    def handle(self, *args: Any, **options: Any) -> None:
        unreadable = 0
        for model, field in ENCRYPTED:
            done, failed = reencrypt_column(model, field)
            unreadable += failed
            self.stdout.write(
                f"{model._meta.label}.{field}: {done} re-encrypted, {failed} unreadable"
            )
        if unreadable:
            raise CommandError(
                f"{unreadable} value(s) were encrypted under a key that is not configured: "
                "add it to TETHER_SECRET_KEY_FALLBACKS and run again"
            )


def reencrypt_column(model: type[models.Model], field: str) -> tuple[int, int]:
    """(re-encrypted, unreadable) for one column, a batch per transaction, so a large fleet
    is not held in one lock and a stop halfway leaves every value readable."""
    done = failed = 0
    last = 0
    while True:
        with transaction.atomic():
            rows = list(
                model.objects.select_for_update()
                .filter(pk__gt=last)
                .exclude(**{field: ""})
                .order_by("pk")
                .values_list("pk", field)[:BATCH]
            )
            for pk, value in rows:
                try:
                    fresh = credentials.reencrypt(value)
                except ValueError:
                    failed += 1
                    continue
                model.objects.filter(pk=pk).update(**{field: fresh})
                done += 1
        if len(rows) < BATCH:
            return done, failed
        last = rows[-1][0]
