"""The server's calls to an agent's RPC endpoint (docs/agent-rpc.md), on the event loop:
a status check holds a coroutine and a socket, never a thread, however many run at once."""

import asyncio
import json
import secrets
import ssl
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from tether.fleet import credentials


@dataclass
class Target:
    """What a call needs, read from the database beforehand (no ORM on the event loop)."""

    agent_id: int
    host: str
    port: int
    secret_key: str
    verify: bool
    ca_pem: str
    good_serials: frozenset[str]  # the agent's certificates that are not revoked


MAX_ANSWER = 1024 * 1024


class RpcError(Exception):
    pass


def _context(target: Target) -> ssl.SSLContext:
    if not target.verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context(cadata=target.ca_pem)
    # Agents move between addresses; the certificate names the agent by id (checked below).
    context.check_hostname = False
    return context


def _check_peer(target: Target, der: bytes | None) -> None:
    if not target.verify:
        return
    if not der:
        raise RpcError("the agent presented no certificate")
    certificate = x509.load_der_x509_certificate(der)
    serial = format(certificate.serial_number, "x")
    if serial not in target.good_serials:
        raise RpcError(f"the agent presented a revoked or unknown certificate (serial {serial})")
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != str(target.agent_id):
        raise RpcError("the agent's certificate names another agent")


def _request(target: Target, method: str, path: str, body: bytes = b"") -> bytes:
    path = f"{path}?nonce={secrets.token_hex(8)}"  # two identical calls must not look replayed
    timestamp = str(int(time.time()))
    signature = credentials.sign(target.secret_key, method, path, timestamp, body)
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: {target.host}:{target.port}",
        f"X-Tether-Timestamp: {timestamp}",
        f"X-Tether-Signature: {signature}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _parse(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head:
        raise RpcError("the agent closed the connection without answering (signature refused?)")
    try:
        status = int(head.split(b"\r\n", 1)[0].split()[1])
        data = json.loads(body or b"{}")
    except (IndexError, ValueError) as exc:
        raise RpcError("the agent's answer is not HTTP/JSON") from exc
    return status, data if isinstance(data, dict) else {}


async def call(target: Target, method: str, path: str, timeout: float) -> tuple[int, dict]:
    """One signed call; RpcError says why it failed, in words an operator can act on."""
    where = f"{target.host}:{target.port}"
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                target.host, target.port, ssl=_context(target), ssl_handshake_timeout=timeout
            )
            ssl_object = writer.get_extra_info("ssl_object")
            _check_peer(target, ssl_object.getpeercert(binary_form=True) if ssl_object else None)
            writer.write(_request(target, method, path))
            await writer.drain()
            raw = await reader.read(MAX_ANSWER)
            while len(raw) <= MAX_ANSWER and (chunk := await reader.read(65536)):
                raw += chunk
            if len(raw) > MAX_ANSWER:
                raise RpcError("the agent's answer is too large")
    except TimeoutError:
        raise RpcError(f"no answer from {where} within {timeout:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise RpcError(f"certificate verification failed: {exc.verify_message}") from None
    except ConnectionRefusedError:
        raise RpcError(f"connection refused at {where}") from None
    except (ssl.SSLError, OSError) as exc:
        raise RpcError(f"cannot reach {where}: {exc.strerror or exc}") from None
    finally:
        if writer is not None:
            writer.close()
    return _parse(raw)
