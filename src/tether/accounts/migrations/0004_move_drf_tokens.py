"""Tokens made before API tokens were named (DRF's authtoken table, plain keys) become API
tokens, hashed, and keep working until TETHER_TOKEN_DAYS from now; then DRF's table is
dropped, so that no usable key stays in the database. Nothing to undo it with: the keys are
no longer known."""

import hashlib
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import migrations
from django.utils import timezone
from django.utils.dateparse import parse_datetime

LEGACY_TABLE = "authtoken_token"
LEGACY_NAME = "API token (from before tokens were named)"


def _aware(value):
    if isinstance(value, str):
        value = parse_datetime(value)
    if not isinstance(value, datetime):
        return timezone.now()
    return value if timezone.is_aware(value) else value.replace(tzinfo=UTC)


def move_drf_tokens(apps, schema_editor):
    connection = schema_editor.connection
    if LEGACY_TABLE not in connection.introspection.table_names():
        return  # a database made after DRF's tokens were retired
    ApiToken = apps.get_model("accounts", "ApiToken")
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {quote('key')}, {quote('user_id')}, {quote('created')} "
            f"FROM {quote(LEGACY_TABLE)}"
        )
        rows = cursor.fetchall()
    days = settings.TOKEN_DAYS
    expires_at = timezone.now() + timedelta(days=days) if days else None
    ApiToken.objects.bulk_create(
        [
            ApiToken(
                user_id=user_id,
                name=LEGACY_NAME,
                prefix=key[:8],
                token_hash=hashlib.sha256(key.encode()).hexdigest(),
                created_at=_aware(created),
                expires_at=expires_at,
            )
            for key, user_id, created in rows
        ]
    )
    schema_editor.execute(f"DROP TABLE {quote(LEGACY_TABLE)}")
    # DRF's app is no longer installed: forget its migrations too, so that installing it
    # again would make its table again rather than believe it exists.
    schema_editor.execute("DELETE FROM django_migrations WHERE app = %s", ["authtoken"])


class Migration(migrations.Migration):
    dependencies = [("accounts", "0003_api_token")]

    operations = [migrations.RunPython(move_drf_tokens, migrations.RunPython.noop)]
