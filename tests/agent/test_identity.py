"""What the agent sends to be known by (machine identity) and to make each request its own
(a nonce, signed): the server's side of both is in tests/fleet/test_identity.py and
test_replay.py."""

from pathlib import Path

from tests.agent.test_manifest import load_agent
from tether.fleet import credentials

agent = load_agent()


def machine_file(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "machine-id"
    path.write_text(value + "\n")
    return path


def test_the_machine_id_is_derived_not_sent_as_is(tmp_path: Path) -> None:
    raw = "0123456789abcdef0123456789abcdef"
    state = tmp_path / "state"
    state.mkdir()

    machine_id, instance_id = agent.machine_identity(str(state), machine_file(tmp_path, raw))

    assert len(machine_id) == 32 and raw not in machine_id
    assert len(instance_id) == 32
    # Kept: the same state dir gives the same identity after a restart.
    assert agent.machine_identity(str(state), machine_file(tmp_path, raw)) == (
        machine_id,
        instance_id,
    )


def test_a_clone_has_the_same_machine_id_and_another_instance(tmp_path: Path) -> None:
    """A cloned host: same /etc/machine-id, same state dir path, but the state dir's own id
    (made at first start) differs once the clone starts from a clean state dir."""
    raw = "0123456789abcdef0123456789abcdef"
    state = tmp_path / "state"
    state.mkdir()
    original = agent.machine_identity(str(state), machine_file(tmp_path, raw))
    (state / "instance-id").unlink()

    clone = agent.machine_identity(str(state), machine_file(tmp_path, raw))

    assert clone[0] == original[0]
    assert clone[1] != original[1]


def test_two_state_dirs_on_one_host_are_two_machines(tmp_path: Path) -> None:
    raw = "0123456789abcdef0123456789abcdef"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    a = agent.machine_identity(str(tmp_path / "a"), machine_file(tmp_path, raw))
    b = agent.machine_identity(str(tmp_path / "b"), machine_file(tmp_path, raw))

    assert a[0] != b[0]


def test_without_a_machine_id_file_the_state_dir_keeps_a_generated_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    missing = tmp_path / "absent"

    first = agent.machine_identity(str(state), missing)

    assert (state / "machine-id").exists()
    assert agent.machine_identity(str(state), missing) == first


def test_every_request_has_its_own_nonce_and_the_server_checks_it() -> None:
    client = agent.Client("http://127.0.0.1:1")
    client.credentials = {"token": "t", "secret_key": "ab" * 32}

    one = client.sign("GET", "/api/agents/poll_commands/?wait=0", b"")
    two = client.sign("GET", "/api/agents/poll_commands/?wait=0", b"")

    assert one["X-Tether-Nonce"] != two["X-Tether-Nonce"]
    expected = credentials.sign(
        "ab" * 32,
        "GET",
        "/api/agents/poll_commands/?wait=0",
        one["X-Tether-Timestamp"],
        b"",
        one["X-Tether-Nonce"],
    )
    assert one["X-Tether-Signature"] == expected
