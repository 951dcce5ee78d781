"""Where an audit event came from (address, user agent), and the indexes that answer the
audit log's filters newest first."""

from django.conf import settings
from django.db import migrations, models


def pattern_index(apps, schema_editor):  # noqa: ANN001, ANN201
    """PostgreSQL answers an action prefix (`agent.`) with LIKE, which uses an index only
    in pattern order; SQLite's prefix is a range over audit_action_at (accounts.selectors)."""
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            "CREATE INDEX audit_action_pattern ON accounts_auditevent (action varchar_pattern_ops)"
        )


def drop_pattern_index(apps, schema_editor):  # noqa: ANN001, ANN201
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP INDEX IF EXISTS audit_action_pattern")


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0004_move_drf_tokens"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="auditevent",
            options={"ordering": ["-at", "-id"]},
        ),
        migrations.AddField(
            model_name="auditevent",
            name="address",
            field=models.GenericIPAddressField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="auditevent",
            name="user_agent",
            field=models.CharField(blank=True, default="", max_length=256),
        ),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(fields=["user", "at", "id"], name="audit_user_at"),
        ),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(fields=["action", "at", "id"], name="audit_action_at"),
        ),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(fields=["target_type", "at", "id"], name="audit_type_at"),
        ),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(
                fields=["target_type", "target_id", "at", "id"], name="audit_target_at"
            ),
        ),
        migrations.RunPython(pattern_index, drop_pattern_index),
    ]
