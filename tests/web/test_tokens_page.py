"""The API tokens page: a person's own tokens, a new one shown once, revoked by a CSRF-
protected form; another user's token is not found."""

from datetime import timedelta

from django.test import Client
from django.utils import timezone

from tether.accounts.models import ApiToken, AuditEvent
from tether.accounts.services import create_api_token

from .test_pages import ESCAPED, XSS, WebTestCase


class TokensPageTestCase(WebTestCase):
    def test_it_lists_own_tokens_without_secrets(self) -> None:
        mine, secret = create_api_token(user=self.alice, name="laptop", expires_in_days=30)
        create_api_token(user=self.bob, name="bobs-token", expires_in_days=30)

        page = self.client.get("/account/tokens/")

        self.assertContains(page, "laptop")
        self.assertContains(page, f"{mine.prefix}…")
        self.assertNotContains(page, secret)
        self.assertNotContains(page, "bobs-token")
        self.assertContains(page, 'href="/account/tokens/"')  # the nav's link

    def test_it_marks_expired_tokens(self) -> None:
        token, _ = create_api_token(user=self.alice, name="old", expires_in_days=1)
        ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(days=1))

        self.assertContains(self.client.get("/account/tokens/"), "expired")

    def test_it_creates_a_token_and_shows_it_once(self) -> None:
        response = self.client.post(
            "/account/tokens/", {"name": "ci runner", "expires_in_days": "30"}
        )

        self.assertEqual(response.status_code, 200)
        token = ApiToken.objects.get(user=self.alice)
        secret = response.context["secret"]
        self.assertContains(response, secret)
        self.assertIn("no-store", response["Cache-Control"])
        self.assertEqual(token.name, "ci runner")
        self.assertAlmostEqual(
            token.expires_at, timezone.now() + timedelta(days=30), delta=timedelta(minutes=1)
        )
        self.assertNotContains(self.client.get("/account/tokens/"), secret)
        self.assertTrue(AuditEvent.objects.filter(action="token.create", user=self.alice))
        api = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
        self.assertEqual(api.get("/api/agents/").status_code, 200)

    def test_never_is_a_choice_not_the_default(self) -> None:
        page = self.client.get("/account/tokens/")
        self.assertContains(page, '<option value="90" selected>')

        self.client.post("/account/tokens/", {"name": "forever", "expires_in_days": "never"})

        self.assertIsNone(ApiToken.objects.get(user=self.alice).expires_at)

    def test_it_refuses_bad_input_and_makes_nothing(self) -> None:
        for body in ({"name": "", "expires_in_days": "30"}, {"name": "x", "expires_in_days": "5"}):
            with self.subTest(body=body):
                response = self.client.post("/account/tokens/", body)
                self.assertEqual(response.status_code, 200)
                self.assertContains(response, 'class="error"')
        self.assertFalse(ApiToken.objects.exists())

    def test_it_escapes_names(self) -> None:
        create_api_token(user=self.alice, name=XSS, expires_in_days=1)

        page = self.client.get("/account/tokens/")

        self.assertNotContains(page, XSS)
        self.assertContains(page, ESCAPED)

    def test_it_revokes(self) -> None:
        token, secret = create_api_token(user=self.alice, name="laptop", expires_in_days=30)

        response = self.client.post(f"/account/tokens/{token.pk}/revoke/")

        self.assertRedirects(response, "/account/tokens/", fetch_redirect_response=False)
        token.refresh_from_db()
        self.assertIsNotNone(token.revoked_at)
        self.assertContains(self.client.get("/account/tokens/"), "No API tokens yet.")
        api = Client(HTTP_AUTHORIZATION=f"Token {secret}")
        self.assertEqual(api.get("/api/agents/").status_code, 401)

    def test_it_validates_ownership(self) -> None:
        bobs, _ = create_api_token(user=self.bob, name="bobs", expires_in_days=30)

        response = self.client.post(f"/account/tokens/{bobs.pk}/revoke/")

        self.assertEqual(response.status_code, 404)
        bobs.refresh_from_db()
        self.assertIsNone(bobs.revoked_at)

    def test_it_only_allows_post_to_revoke(self) -> None:
        token, _ = create_api_token(user=self.alice, name="laptop", expires_in_days=30)

        self.assertEqual(self.client.get(f"/account/tokens/{token.pk}/revoke/").status_code, 405)

    def test_its_forms_need_csrf(self) -> None:
        token, _ = create_api_token(user=self.alice, name="laptop", expires_in_days=30)
        client = Client(enforce_csrf_checks=True)
        client.force_login(self.alice)

        created = client.post("/account/tokens/", {"name": "x", "expires_in_days": "30"})
        revoked = client.post(f"/account/tokens/{token.pk}/revoke/")

        self.assertEqual((created.status_code, revoked.status_code), (403, 403))
        self.assertEqual(ApiToken.objects.filter(revoked_at__isnull=True).count(), 1)

    def test_it_sends_anonymous_visitors_to_login(self) -> None:
        response = Client().get("/account/tokens/")

        self.assertEqual(response.status_code, 302)
        self.assertTrue(response["Location"].startswith("/login/?next="))
