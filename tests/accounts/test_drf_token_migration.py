"""Tokens made before API tokens were named (DRF's plain-text table) keep working, hashed,
and their plain keys leave the database."""

import importlib
from datetime import UTC, datetime, timedelta

from django.apps import apps
from django.db import connection
from django.test import TransactionTestCase
from django.utils import timezone
from rest_framework.test import APIClient

from tether.accounts.models import ApiToken

from ..base import User

migration = importlib.import_module("tether.accounts.migrations.0004_move_drf_tokens")
KEY = "1c8c8947f3eb5c3230506d47c71329f56f46e43c"


class MoveDrfTokensTestCase(TransactionTestCase):
    def setUp(self) -> None:
        self.alice = User.objects.create_user("alice")
        with connection.cursor() as cursor:
            cursor.execute(
                'CREATE TABLE authtoken_token ("key" varchar(40) PRIMARY KEY, '
                '"created" timestamp NOT NULL, "user_id" integer NOT NULL)'
            )
            cursor.execute(
                "INSERT INTO authtoken_token VALUES (%s, %s, %s)",
                [KEY, "2025-01-02 03:04:05", self.alice.pk],
            )

    def tearDown(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS authtoken_token")

    def test_the_old_key_keeps_working_and_leaves_the_database(self) -> None:
        with connection.schema_editor() as editor:
            migration.move_drf_tokens(apps, editor)

        self.assertNotIn("authtoken_token", connection.introspection.table_names())
        token = ApiToken.objects.get()
        self.assertEqual((token.user, token.prefix), (self.alice, KEY[:8]))
        self.assertNotEqual(token.token_hash, KEY)
        self.assertEqual(token.created_at, datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))
        self.assertAlmostEqual(
            token.expires_at, timezone.now() + timedelta(days=90), delta=timedelta(minutes=1)
        )
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {KEY}")
        self.assertEqual(client.get("/api/agents/").status_code, 200)
        client.credentials(HTTP_AUTHORIZATION=f"Token {KEY[:-1]}0")
        self.assertEqual(client.get("/api/agents/").status_code, 401)
