"""Credential formats and storage, in one place (DESIGN §6).

Agent tokens are random UUIDs (the original system's format), accepted with or without
hyphens; secret keys carry 256 bits; server tokens 192 bits. Tokens are stored as SHA-256
hashes (they are high-entropy lookup keys, so a fast hash is enough); secrets the server
must use again are encrypted with a key derived from SECRET_KEY.
"""

import base64
import hashlib
import hmac
import secrets
import uuid
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings


def new_agent_token() -> str:
    return str(uuid.uuid4())


def new_secret_key() -> str:
    return secrets.token_hex(32)


def new_server_token() -> str:
    """A prefix makes the token recognisable to secret scanners, and keeps it from starting
    with "-", which command-line parsers would read as an option."""
    return "tsrv_" + secrets.token_urlsafe(24)


def canonical_agent_token(raw: str) -> str | None:
    """The token's 32 lowercase hex digits, or None when it is not a UUID at all."""
    try:
        return uuid.UUID(hex=raw.strip()).hex
    except (ValueError, AttributeError):
        return None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def hash_agent_token(token: str) -> str:
    canonical = canonical_agent_token(token)
    if canonical is None:
        raise ValueError("not a UUID")
    return hash_token(canonical)


@lru_cache(maxsize=16)
def _fernet(secret_key: str) -> Fernet:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"tether-credentials", info=b"fernet"
    ).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def _keys() -> MultiFernet:
    """SECRET_KEY encrypts; it and SECRET_KEY_FALLBACKS decrypt, so a key can be rotated
    without locking every agent out (`tether reencrypt` then moves the values over)."""
    return MultiFernet(
        [_fernet(key) for key in (settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS)]
    )


def encrypt(value: str) -> str:
    return _keys().encrypt(value.encode()).decode()


def decrypt(value: str) -> str:
    """Raises ValueError when the value was encrypted under a key no longer configured."""
    try:
        return _keys().decrypt(value.encode()).decode()
    except InvalidToken as exc:
        raise ValueError("cannot decrypt: SECRET_KEY changed?") from exc


def reencrypt(value: str) -> str:
    """`value` encrypted under SECRET_KEY (ValueError as for decrypt)."""
    try:
        return _keys().rotate(value.encode()).decode()
    except InvalidToken as exc:
        raise ValueError("cannot decrypt: SECRET_KEY changed?") from exc


def sign(
    secret_key: str, method: str, path: str, timestamp: str, body: bytes, nonce: str = ""
) -> str:
    """The request signature of docs/agent-protocol.md; the agent computes the same. With a
    nonce (the agent's X-Tether-Nonce) it is signed too, so a replay cannot swap in a fresh
    one; without, the message is the one agents signed before nonces."""
    parts = [method.upper(), path, timestamp, hashlib.sha256(body).hexdigest()]
    if nonce:
        parts.insert(3, nonce)
    message = "\n".join(parts)
    return hmac.new(secret_key.encode("ascii"), message.encode(), hashlib.sha256).hexdigest()


def canonical_json(value: object) -> bytes:
    """The bytes a signed document is signed over; the agent re-encodes what it parsed the
    same way (sorted keys, no spaces), so both sides hash identical bytes."""
    import json

    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sign_document(secret_key: str, document: object) -> str:
    return hmac.new(
        secret_key.encode("ascii"), b"tether-manifest\n" + canonical_json(document), hashlib.sha256
    ).hexdigest()
