"""The human API token's format, in one place (DESIGN §6).

A token is `tht_` and 256 random bits: the marker makes it recognisable to secret scanners
and keeps it from starting with "-". It is stored as a SHA-256 hash: a high-entropy lookup
key needs no slow hash, and finding a row by its hash (a unique index) compares nothing
character by character in Python, so timing tells nothing about which tokens exist.
"""

import hashlib
import secrets

MARKER = "tht_"
# What a list shows of a token: the marker and 8 characters (48 of its 256 bits), enough to
# tell one's tokens apart. Tokens from before (DRF's 40 hex digits) show their first 8.
PREFIX_LENGTH = len(MARKER) + 8
LEGACY_PREFIX_LENGTH = 8
# No token is longer; anything longer is refused before it is hashed.
MAX_LENGTH = 128


def new_api_token() -> str:
    return MARKER + secrets.token_urlsafe(32)


def hash_api_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_prefix(token: str) -> str:
    return token[: PREFIX_LENGTH if token.startswith(MARKER) else LEGACY_PREFIX_LENGTH]
