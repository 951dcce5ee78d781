"""The login form, and the account page: a person's API tokens, listed, made (the secret
shown once) and revoked."""

import math
from typing import Any

from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import NON_FIELD_ERRORS
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_http_methods, require_POST

from tether.accounts.selectors import api_tokens_of
from tether.accounts.services import audit, create_api_token, revoke_api_token
from tether.accounts.throttling import LoginGuard

from .forms import ApiTokenForm


@login_required
@require_http_methods(["GET", "POST"])
def tokens(request: HttpRequest) -> HttpResponse:
    form = ApiTokenForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        token, secret = create_api_token(user=request.user, **form.cleaned_data)
        response = render(request, "web/token_created.html", {"token": token, "secret": secret})
        add_never_cache_headers(response)  # shown once: not from the back button's cache either
        return response
    listing = api_tokens_of(request.user)
    context = {"tokens": listing, "form": form, "now": timezone.now()}
    return render(request, "web/tokens.html", context)


@login_required
@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    token = get_object_or_404(api_tokens_of(request.user), pk=token_id)
    revoke_api_token(token=token, user=request.user)
    messages.success(request, f"Token {token.name} ({token.prefix}…) was revoked.")
    return redirect("web:tokens")


class LoginView(auth_views.LoginView):
    """Django's login form, throttled as the API's login is: failed attempts per username
    and per address; past either rate the form answers 429 (with Retry-After) before the
    password is checked. A login is an audit event (`user.login`, with where from), as an
    API login is (the token it makes)."""

    template_name = "web/login.html"
    redirect_authenticated_user = True
    next_page = "web:fleet"

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        self.guard = LoginGuard(request)
        wait = self.guard.wait()
        if wait is None:
            return super().post(request, *args, **kwargs)
        seconds = math.ceil(wait)
        # Unbound, so that its password is not checked; the username stays in the field.
        form = self.get_form_class()(request, initial={"username": request.POST.get("username")})
        context = self.get_context_data(form=form, throttled=seconds)
        response = self.render_to_response(context, status=429)
        response["Retry-After"] = str(seconds)
        return response

    def form_valid(self, form: AuthenticationForm) -> HttpResponse:
        response = super().form_valid(form)
        audit(user=form.get_user(), action="user.login", target=form.get_user())
        return response

    def form_invalid(self, form: Any) -> HttpResponse:
        if form.has_error(NON_FIELD_ERRORS, "invalid_login"):
            self.guard.failed()
        return super().form_invalid(form)
