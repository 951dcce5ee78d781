"""The built-in certificate authority: its key pair on disk, and the certificates it signs.

EC P-256 throughout: small keys, fast handshakes, and what every TLS stack the agents run on
accepts. The CA's key never leaves TETHER_DATA_DIR (or the operator's own path)."""

import datetime as dt
import fcntl
import ipaddress
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

CA_DAYS = 3650


@dataclass(frozen=True)
class Authority:
    certificate: x509.Certificate
    key: PrivateKeyTypes  # an operator's CA may be RSA; ours is EC

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    cert_pem: str
    key_pem: str

    @property
    def serial(self) -> str:
        return format(self.certificate.serial_number, "x")

    @property
    def fingerprint(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()


def _ca_paths() -> tuple[Path, Path]:
    if bool(settings.CA_CERT_PATH) != bool(settings.CA_KEY_PATH):
        raise ImproperlyConfigured("TETHER_CA_CERT and TETHER_CA_KEY go together")
    if settings.CA_CERT_PATH:
        return Path(settings.CA_CERT_PATH), Path(settings.CA_KEY_PATH)
    directory = settings.DATA_DIR / "ca"
    return directory / "ca.crt", directory / "ca.key"


def _write(path: Path, data: bytes, mode: int) -> None:
    """Created with its mode from the start (never world-readable for a moment), atomically."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _create(cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tether CA")])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    # The certificate first, the key last: the key's presence means the CA is whole.
    _write(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(key_path, _key_pem(key).encode(), 0o600)


def _key_pem(key: PrivateKeyTypes) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@lru_cache(maxsize=1)
def authority() -> Authority:
    """The CA, created on first use unless the operator gave one (TETHER_CA_CERT/KEY)."""
    cert_path, key_path = _ca_paths()
    if not settings.CA_CERT_PATH and not key_path.exists():
        cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Several processes may start at once (serve, worker): one makes the CA.
        with open(cert_path.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not key_path.exists():
                _create(cert_path, key_path)
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return Authority(certificate=certificate, key=key)


def _alt_names(names: list[str]) -> list[x509.GeneralName]:
    alt: list[x509.GeneralName] = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    return alt


def pin_for_agents() -> str | None:
    """The CA agents should pin for reaching this server, when it is the one vouching for it."""
    return authority().pem if settings.SERVES_BUILTIN_TLS else None


def issue(common_name: str, names: list[str], days: int) -> Issued:
    """A leaf certificate with a fresh key, for TLS servers (agents' RPC, `serve --tls`)."""
    ca = authority()
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        # 64 random bits, positive: unique enough to be the revocation key.
        .serial_number(secrets.randbits(63) | (1 << 62))
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    alt = _alt_names(names)
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    certificate = builder.sign(ca.key, hashes.SHA256())
    return Issued(
        certificate=certificate,
        cert_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=_key_pem(key),
    )


def server_certificate(names: list[str]) -> tuple[Path, Path]:
    """The certificate `tether serve --tls` presents, issued by the CA for `names` and
    re-issued when missing, for other names, or within 30 days of expiry."""
    directory = settings.DATA_DIR / "ca"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    if cert_path.exists() and key_path.exists():
        current = x509.load_pem_x509_certificate(cert_path.read_bytes())
        try:
            alt = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            covered = {str(v) for v in alt.get_values_for_type(x509.DNSName)} | {
                str(v) for v in alt.get_values_for_type(x509.IPAddress)
            }
        except x509.ExtensionNotFound:
            covered = set()
        fresh = current.not_valid_after_utc - _now() > dt.timedelta(days=30)
        try:  # signed by this CA, not only by one of the same name
            current.verify_directly_issued_by(authority().certificate)
            same_ca = True
        except (ValueError, TypeError, InvalidSignature):
            same_ca = False
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        pair = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == current.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if fresh and same_ca and pair and set(filter(None, names)) <= covered:
            return cert_path, key_path
    issued = issue("tether-server", names, days=365)
    _write(key_path, issued.key_pem.encode(), 0o600)
    _write(cert_path, (issued.cert_pem + authority().pem).encode(), 0o644)
    return cert_path, key_path
