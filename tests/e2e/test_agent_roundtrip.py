"""A real agent against a real server: output, exit codes, big and binary output, timeouts."""

import base64
import random

from tests.conftest import Fleet, processes_matching, wait_for


def test_it_runs_a_command_and_reports_exit_code_and_streams(fleet: Fleet) -> None:
    command = fleet.run("echo hello-$((40+2)); echo oops >&2; exit 3")
    assert command["status"] == "failed"
    assert command["exit_code"] == 3
    assert command["stdout"] == "hello-42\n"
    assert command["stderr"] == "oops\n"
    assert command["started_at"] and command["finished_at"]


def test_it_reports_success_with_exact_stdout(fleet: Fleet) -> None:
    command = fleet.run("printf 'a\\nb\\n'")
    assert (command["status"], command["exit_code"], command["stdout"]) == (
        "succeeded",
        0,
        "a\nb\n",
    )


def test_it_runs_argv_without_a_shell(fleet: Fleet) -> None:
    command = fleet.run("printf", args=["%s|", "a b", "$(id)", ";", "*"])
    assert command["status"] == "succeeded"
    assert command["stdout"] == "a b|$(id)|;|*|"


def test_it_delivers_large_output_byte_exact(fleet: Fleet) -> None:
    command = fleet.run("seq 1 200000", wait=60)
    expected = "".join(f"{i}\n" for i in range(1, 200001))
    assert command["status"] == "succeeded"
    assert len(command["stdout"]) == len(expected)
    assert command["stdout"] == expected
    assert not command["truncated"]


def test_it_keeps_binary_output_through_base64(fleet: Fleet) -> None:
    payload = bytes(range(256)) * 64 + b"\xff\xfe\x00tail"
    encoded = base64.b64encode(payload).decode()
    command = fleet.run(f"echo {encoded} | base64 -d")
    assert command["status"] == "succeeded"
    # The API decodes to text; the exact bytes are checked at the storage level.
    rows = fleet.server.sql(
        "SELECT data FROM commands_outputchunk WHERE command_id = ? AND stream = 'stdout' "
        'ORDER BY "offset"',
        command["id"],
    )
    assert b"".join(bytes(r[0]) for r in rows) == payload


def test_it_times_out_and_leaves_no_process_behind(fleet: Fleet) -> None:
    marker = f"{random.randint(100, 999)}.{random.randint(100000, 999999)}"
    command = fleet.run(f"sleep {marker} & sleep {marker}; echo never", wait=30, timeout=2)
    assert command["status"] == "timed_out"
    assert "never" not in command["stdout"]
    wait_for(
        lambda: not processes_matching(f"sleep {marker}"), timeout=5, what="no sleep left behind"
    )


def test_it_runs_commands_concurrently(fleet: Fleet) -> None:
    slow = fleet.send("sleep 20", timeout=30)
    wait_for(lambda: fleet.command(slow["id"])["status"] == "running", what="slow one running")
    quick = fleet.run("echo quick", wait=10)
    assert quick["status"] == "succeeded"
    assert fleet.command(slow["id"])["status"] == "running"
    fleet.api.post(f"/api/commands/{slow['id']}/cancel/")


def test_template_parameters_cannot_inject_a_command(fleet: Fleet, tmp_path) -> None:
    target = tmp_path / "pwned"
    status, template = fleet.api.post(
        "/api/agents/command-templates/",
        {
            "name": f"greet-{fleet.agent_id}",
            "command": "echo hello {who}",
            "parameters": [{"name": "who", "type": "string"}],
        },
    )
    assert status == 201, template
    status, command = fleet.api.post(
        f"/api/agents/{fleet.agent_id}/send_command/",
        {"template": template["id"], "params": {"who": f"x; touch {target}"}},
    )
    assert status == 201, command
    done = fleet.wait_final(command["id"])
    assert done["status"] == "succeeded"
    assert done["stdout"] == f"hello x; touch {target}\n"
    assert not target.exists()


def test_output_past_the_cap_is_dropped_and_marked_truncated(fleet: Fleet) -> None:
    # The test server keeps the default 16 MiB cap; 17 MiB of output crosses it.
    command = fleet.run("head -c 17825792 /dev/zero | tr '\\0' 'x'", wait=60)
    assert command["status"] == "succeeded"
    assert command["truncated"] is True
    stored = fleet.server.sql(
        "SELECT stored_bytes FROM commands_command WHERE id = ?", command["id"]
    )[0][0]
    assert stored == 16 * 1024 * 1024


def test_empty_args_still_mean_argv_not_a_shell(fleet: Fleet, tmp_path) -> None:
    target = tmp_path / "shell-ran"
    command = fleet.run(f"/bin/true; touch {target}", args=[])
    assert command["status"] == "failed"
    assert command["exit_code"] == 127
    assert not target.exists()
