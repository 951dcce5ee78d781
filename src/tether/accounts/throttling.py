"""Login throttles, shared by the API's token login and the web login form.

Only failed attempts count: a script that logs in often is never slowed, while a password
guesser is, per username (TETHER_LOGIN_RATE) and per address (TETHER_LOGIN_ADDRESS_RATE). A
throttled attempt is refused before its password is checked, so it costs no hashing either.
They are DRF throttles on Django's default cache: shared by every process on PostgreSQL.
"""

import hashlib
import unicodedata
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.http import HttpRequest
from rest_framework.throttling import SimpleRateThrottle


class SettingRateThrottle(SimpleRateThrottle):
    """DRF's throttle, its rate the Django setting `rate_setting` (read per request: DRF
    reads its own rates once, at import), and a wait that is exact: until the oldest attempt
    that fills the allowance leaves the window (DRF's spreads the remaining ones out)."""

    rate_setting = ""

    def get_rate(self) -> str:
        return getattr(settings, self.rate_setting)

    def wait(self) -> float:
        if len(self.history) < max(self.num_requests, 1):
            return float(self.duration)
        oldest = self.history[self.num_requests - 1]
        return max(1.0, oldest + self.duration - self.now)


class FailedLoginThrottle(SettingRateThrottle):
    """Checks on every attempt but records only when told the attempt failed (`failed()`,
    after DRF's `allow_request` has run)."""

    def throttle_success(self) -> bool:
        return True  # an attempt counts when it fails, not when it is let through

    def failed(self) -> None:
        """Count the attempt `allow_request` let through: its password was wrong."""
        if getattr(self, "key", None) is not None:
            super().throttle_success()


class LoginUserThrottle(FailedLoginThrottle):
    scope = "login_user"
    rate_setting = "LOGIN_RATE"

    def get_cache_key(self, request: Any, view: Any) -> str | None:
        username = login_username(request)
        if not username.strip():
            return None
        # Normalized as the login form does (and case-folded), so that " Alice" counts as
        # "alice"; hashed, so that any text fits a cache key and the cache holds no usernames.
        canonical = unicodedata.normalize("NFKC", username.strip()).casefold()
        ident = hashlib.sha256(canonical.encode()).hexdigest()
        return self.cache_format % {"scope": self.scope, "ident": ident}


class LoginAddressThrottle(FailedLoginThrottle):
    scope = "login_address"
    rate_setting = "LOGIN_ADDRESS_RATE"

    def get_cache_key(self, request: Any, view: Any) -> str:
        # The peer address as every throttle reads it (X-Forwarded-For behind NUM_PROXIES).
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


LOGIN_THROTTLES = (LoginUserThrottle, LoginAddressThrottle)


def login_username(request: Any) -> str:
    """The username a login names: DRF's parsed body, or a form's POST."""
    data = request.data if hasattr(request, "data") else request.POST
    username = data.get("username") if isinstance(data, Mapping) else None
    return username if isinstance(username, str) else ""


class LoginGuard:
    """The login throttles for a view that is not DRF's (the web form): `wait()` before the
    password is checked, `failed()` when it was wrong."""

    def __init__(self, request: HttpRequest) -> None:
        self.request = request
        self.throttles = [throttle() for throttle in LOGIN_THROTTLES]

    def wait(self) -> float | None:
        """Seconds until this attempt may be made, or None when it may be made now."""
        waits = [
            throttle.wait()
            for throttle in self.throttles
            if not throttle.allow_request(self.request, None)
        ]
        return max(waits) if waits else None

    def failed(self) -> None:
        for throttle in self.throttles:
            throttle.failed()
