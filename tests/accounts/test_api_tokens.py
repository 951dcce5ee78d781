"""Human API tokens (issue 13, row 11): hashed at rest, several per user, named, expiring,
listed without their secret and revoked; every refusal the same 401."""

from datetime import datetime, timedelta

from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from tether.accounts.models import ApiToken, AuditEvent
from tether.accounts.services import create_api_token

from ..base import BaseTestCase, User

PASSWORD = "carol-pw-for-tests"


class TokenTestCase(BaseTestCase):
    def token_client(self, secret: str, keyword: str = "Token") -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"{keyword} {secret}")
        return client

    def new_token(self, user: User | None = None, days: int | None = 30, name: str = "ci"):
        return create_api_token(user=user or self.alice, name=name, expires_in_days=days)

    def assertRefused(self, secret: str) -> None:
        error = self.assertError(self.token_client(secret).get("/api/agents/"), 401)
        self.assertEqual(error["message"], "Invalid token.")


class ObtainTokenTestCase(TokenTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.carol = User.objects.create_user("carol", password=PASSWORD)
        self.anonymous = APIClient()

    def test_it_works(self) -> None:
        response = self.post_json(
            "/api/auth/token/", {"username": "carol", "password": PASSWORD}, self.anonymous
        )

        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        self.assertEqual(body["name"], "API login")
        self.assertTrue(body["token"].startswith(body["prefix"]))
        expires = timezone.now() + timedelta(days=90)
        self.assertAlmostEqual(
            datetime.fromisoformat(body["expires_at"]), expires, delta=timedelta(seconds=60)
        )
        agents = self.token_client(body["token"]).get("/api/agents/")
        self.assertEqual(agents.status_code, 200, agents.content)

    def test_it_names_and_bounds_the_token(self) -> None:
        response = self.post_json(
            "/api/auth/token/",
            {"username": "carol", "password": PASSWORD, "name": "laptop", "expires_in_days": 2},
            self.anonymous,
        )

        self.assertEqual(response.status_code, 200, response.content)
        token = ApiToken.objects.get(pk=response.json()["id"])
        self.assertEqual((token.user, token.name), (self.carol, "laptop"))
        self.assertAlmostEqual(
            token.expires_at, timezone.now() + timedelta(days=2), delta=timedelta(seconds=60)
        )

    def test_each_login_is_a_token_of_its_own(self) -> None:
        body = {"username": "carol", "password": PASSWORD}
        first = self.post_json("/api/auth/token/", body, self.anonymous).json()["token"]
        second = self.post_json("/api/auth/token/", body, self.anonymous).json()["token"]

        self.assertNotEqual(first, second)
        self.assertEqual(self.token_client(first).get("/api/agents/").status_code, 200)
        self.assertEqual(self.token_client(second).get("/api/agents/").status_code, 200)

    def test_it_refuses_a_wrong_password_and_makes_nothing(self) -> None:
        response = self.post_json(
            "/api/auth/token/", {"username": "carol", "password": "wrong"}, self.anonymous
        )

        error = self.assertError(response, 400)
        self.assertEqual(error["message"], "Unable to log in with provided credentials.")
        self.assertFalse(ApiToken.objects.exists())

    def test_it_refuses_bad_expiry_and_makes_nothing(self) -> None:
        for days in (0, -1, 3651, "soon", 2**63):
            with self.subTest(days=days):
                response = self.post_json(
                    "/api/auth/token/",
                    {"username": "carol", "password": PASSWORD, "expires_in_days": days},
                    self.anonymous,
                )
                self.assertError(response, 400, "invalid")
        self.assertFalse(ApiToken.objects.exists())


class CreateTokenTestCase(TokenTestCase):
    def test_it_shows_the_secret_once_and_stores_only_its_hash(self) -> None:
        response = self.post_json("/api/auth/tokens/", {"name": "deploy bot"})

        self.assertEqual(response.status_code, 201, response.content)
        body = response.json()
        self.assertEqual(
            set(body), {"id", "name", "prefix", "created_at", "expires_at", "last_used_at", "token"}
        )
        secret = body["token"]
        self.assertTrue(secret.startswith("tht_"))
        self.assertGreaterEqual(len(secret), 40)
        stored = ApiToken.objects.filter(pk=body["id"]).values().get()
        self.assertNotIn(secret, [str(value) for value in stored.values()])
        self.assertEqual(stored["prefix"], secret[:12])
        self.assertEqual(self.token_client(secret).get("/api/agents/").status_code, 200)

    def test_a_null_expiry_is_a_token_that_never_expires(self) -> None:
        response = self.post_json("/api/auth/tokens/", {"name": "forever", "expires_in_days": None})

        self.assertEqual(response.status_code, 201, response.content)
        self.assertIsNone(response.json()["expires_at"])

    @override_settings(TOKEN_DAYS=7)
    def test_without_an_expiry_it_lives_token_days(self) -> None:
        body = self.post_json("/api/auth/tokens/", {"name": "week"}).json()

        expires = datetime.fromisoformat(body["expires_at"])
        self.assertAlmostEqual(
            expires, timezone.now() + timedelta(days=7), delta=timedelta(seconds=60)
        )

    def test_it_is_audited(self) -> None:
        body = self.post_json("/api/auth/tokens/", {"name": "audited"}).json()

        event = AuditEvent.objects.get(action="token.create")
        self.assertEqual((event.user, event.target_id), (self.alice, str(body["id"])))
        self.assertEqual(event.details["name"], "audited")
        self.assertNotIn(body["token"], str(event.details))

    def test_it_validates_its_input(self) -> None:
        for body in ({}, {"name": ""}, {"name": "x" * 101}, {"name": "a", "expires_in_days": 0}):
            with self.subTest(body=body):
                self.assertError(self.post_json("/api/auth/tokens/", body), 400, "invalid")
        self.assertError(self.post_json("/api/auth/tokens/", {"name": "a", "id": 1}), 400)
        self.assertFalse(ApiToken.objects.exists())

    def test_it_requires_a_login(self) -> None:
        self.assertError(self.post_json("/api/auth/tokens/", {"name": "x"}, APIClient()), 401)
        self.assertFalse(ApiToken.objects.exists())


class ListTokensTestCase(TokenTestCase):
    def test_it_lists_own_tokens_without_their_secrets(self) -> None:
        mine, secret = self.new_token(name="mine")
        self.new_token(user=self.bob, name="bob's")

        response = self.client.get("/api/auth/tokens/")

        self.assertEqual(response.status_code, 200, response.content)
        rows = response.json()["results"]
        self.assertEqual([row["name"] for row in rows], ["mine"])
        self.assertEqual(
            set(rows[0]), {"id", "name", "prefix", "created_at", "expires_at", "last_used_at"}
        )
        self.assertEqual(rows[0]["prefix"], secret[:12])
        self.assertNotIn(secret, response.content.decode())

    def test_staff_see_only_their_own_too(self) -> None:
        self.new_token(user=self.bob, name="bob's")
        admin = User.objects.create_user("admin", is_staff=True, is_superuser=True)

        response = self.client_for(admin).get("/api/auth/tokens/")

        self.assertEqual(response.json()["results"], [])
        self.assertError(self.client_for(admin).delete(f"/api/auth/tokens/{self.bob.pk}/"), 404)


class RevokeTokenTestCase(TokenTestCase):
    def test_it_works(self) -> None:
        token, secret = self.new_token()
        client = self.token_client(secret)
        self.assertEqual(client.get("/api/agents/").status_code, 200)

        response = self.client.delete(f"/api/auth/tokens/{token.pk}/")

        self.assertEqual(response.status_code, 204, response.content)
        self.assertRefused(secret)
        self.assertEqual(self.client.get("/api/auth/tokens/").json()["results"], [])
        event = AuditEvent.objects.get(action="token.revoke")
        self.assertEqual((event.user, event.target_id), (self.alice, str(token.pk)))

    def test_a_token_can_revoke_itself(self) -> None:
        token, secret = self.new_token()

        response = self.token_client(secret).delete(f"/api/auth/tokens/{token.pk}/")

        self.assertEqual(response.status_code, 204, response.content)
        self.assertRefused(secret)

    def test_it_validates_ownership(self) -> None:
        bobs, secret = self.new_token(user=self.bob)

        self.assertError(self.client.delete(f"/api/auth/tokens/{bobs.pk}/"), 404, "not_found")

        bobs.refresh_from_db()
        self.assertIsNone(bobs.revoked_at)
        self.assertEqual(self.token_client(secret).get("/api/agents/").status_code, 200)

    def test_it_handles_a_missing_or_revoked_token(self) -> None:
        token, _ = self.new_token()
        self.client.delete(f"/api/auth/tokens/{token.pk}/")

        self.assertError(self.client.delete(f"/api/auth/tokens/{token.pk}/"), 404)
        self.assertError(self.client.delete("/api/auth/tokens/999999/"), 404)
        self.assertEqual(AuditEvent.objects.filter(action="token.revoke").count(), 1)


class TokenAuthenticationTestCase(TokenTestCase):
    def test_bearer_works_as_well_as_token(self) -> None:
        _, secret = self.new_token()

        for keyword in ("Bearer", "bearer", "Token"):
            with self.subTest(keyword=keyword):
                response = self.token_client(secret, keyword).get("/api/agents/")
                self.assertEqual(response.status_code, 200, response.content)
                self.assertEqual([a["id"] for a in response.json()["results"]], [self.agent.pk])

    def test_an_expired_token_is_refused_like_an_unknown_one(self) -> None:
        token, secret = self.new_token()
        ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now())

        self.assertRefused(secret)
        self.assertRefused("tht_" + "x" * 43)

    def test_a_token_of_an_inactive_user_is_refused(self) -> None:
        _, secret = self.new_token(user=self.bob)
        User.objects.filter(pk=self.bob.pk).update(is_active=False)

        self.assertRefused(secret)

    def test_malformed_headers_are_refused_alike(self) -> None:
        for header in ("Token", "Token a b", "Bearer " + "x" * 500, "Token caf\u00e9"):
            with self.subTest(header=header):
                client = APIClient()
                client.credentials(HTTP_AUTHORIZATION=header)
                error = self.assertError(client.get("/api/agents/"), 401)
                self.assertEqual(error["message"], "Invalid token.")

    def test_the_stored_hash_is_not_a_token(self) -> None:
        token, _ = self.new_token()

        self.assertRefused(token.token_hash)

    def test_last_use_is_written_at_most_once_a_minute(self) -> None:
        token, secret = self.new_token()
        client = self.token_client(secret)

        client.get("/api/auth/tokens/")
        token.refresh_from_db()
        first_use = token.last_used_at
        self.assertIsNotNone(first_use)
        with CaptureQueriesContext(connection) as queries:
            client.get("/api/auth/tokens/")
        self.assertFalse([q for q in queries if q["sql"].startswith("UPDATE")])
        token.refresh_from_db()
        self.assertEqual(token.last_used_at, first_use)

        ApiToken.objects.filter(pk=token.pk).update(last_used_at=first_use - timedelta(minutes=2))
        listed = client.get("/api/auth/tokens/").json()["results"][0]
        token.refresh_from_db()
        self.assertGreater(token.last_used_at, first_use - timedelta(minutes=1))
        self.assertEqual(datetime.fromisoformat(listed["last_used_at"]), token.last_used_at)

    def test_live_streams_refuse_a_revoked_token_too(self) -> None:
        token, secret = self.new_token()
        command = self.queue()
        token.revoked_at = timezone.now()
        token.save()

        response = self.token_client(secret).get(f"/api/commands/{command.pk}/stream/")

        error = self.assertError(response, 401, "authentication_failed")
        self.assertEqual(error["message"], "Invalid token.")
