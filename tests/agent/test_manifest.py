"""The agent's check of an upgrade manifest: only what the server signed for this agent, lately,
is installed. The server signs with `credentials.sign_document`; the agent checks the same bytes."""

import importlib.util
import time

import pytest

from tests.conftest import AGENT
from tether.fleet.credentials import sign_document

SECRET = "ab" * 32


def load_agent():
    spec = importlib.util.spec_from_file_location("tether_agent_under_test", AGENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agent = load_agent()


def signed(manifest: dict, secret: str = SECRET) -> dict:
    return {"manifest": manifest, "signature": sign_document(secret, manifest)}


def manifest(**changes: object) -> dict:
    base = {
        "agent_id": 7,
        "version": "0.2.0",
        "files": {"main.py": {"sha256": "0" * 64, "size": 10}},
        "issued_at": int(time.time()),
    }
    return {**base, **changes}


def test_a_manifest_signed_by_the_server_for_this_agent_is_accepted() -> None:
    version, files = agent.check_manifest(signed(manifest()), SECRET, 7, int(time.time()))

    assert version == "0.2.0"
    assert files["main.py"]["size"] == 10


@pytest.mark.parametrize(
    ("body", "agent_id", "reason"),
    [
        (signed(manifest(), secret="cd" * 32), 7, "signature does not match"),
        ({**signed(manifest()), "manifest": manifest(version="6.6.6")}, 7, "signature"),
        (signed(manifest()), 8, "another agent"),
        (signed(manifest(issued_at=int(time.time()) - 3600)), 7, "too old"),
        (signed(manifest(files={})), 7, "no main.py"),
        ({"manifest": "x", "signature": 1}, 7, "malformed"),
    ],
    ids=["other-key", "tampered", "other-agent", "old", "no-main", "malformed"],
)
def test_anything_else_is_refused(body: dict, agent_id: int, reason: str) -> None:
    with pytest.raises(agent.LifecycleError, match=reason):
        agent.check_manifest(body, SECRET, agent_id, int(time.time()))
