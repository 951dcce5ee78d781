"""`tetherctl run TARGET... -- COMMAND` against a real server and five real agents (the runs
API of docs/runs.md): live output by host, a summary, exit status, --json, Ctrl-C."""

import json
import os
import pty
import re
import select
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.cli.conftest import TETHERCTL, Operator, unique
from tests.conftest import FINAL, TetherServer, wait_for

pytestmark = pytest.mark.e2e


@dataclass
class Web:
    operator: Operator
    hostnames: list[str]


@pytest.fixture(scope="module")
def web(tether: TetherServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """An operator with five online agents tagged `web` and one tagged `db`, each with a
    hostname of its own; shared by this module's tests (each run leaves every target final)."""
    operator = Operator(tether, tmp_path_factory.mktemp("web"))
    hostnames = [unique(f"web-{n}") for n in range(1, 6)]
    operator.hosts(*hostnames, tags=("web",))
    operator.hosts(unique("db-1"), tags=("db",))
    yield Web(operator, hostnames)
    operator.close()


def summary_rows(stdout: str) -> dict[str, str]:
    return {line.split("│")[1].strip(): line for line in stdout.splitlines() if "│" in line}


def test_it_runs_on_five_agents_and_prints_each_output_and_a_summary(web: Web) -> None:
    operator, hostnames = web.operator, web.hostnames
    done = operator.ctl("run", "tag:web", "--", "uname", "-a")

    assert done.returncode == 0, done.stdout + done.stderr
    uname = subprocess.run(["uname", "-s"], capture_output=True, text=True).stdout.strip()
    for hostname in hostnames:
        assert re.search(rf"^{re.escape(hostname)} +\| {uname} ", done.stdout, re.M), done.stdout
    rows = summary_rows(done.stdout)
    assert set(rows) == set(hostnames)
    assert all(re.search(r"succeeded\s+│\s+0\s+│\s+\d+\.\d\ds", row) for row in rows.values())
    assert "5 targets: 5 succeeded" in done.stdout
    assert re.match(r"run \d+: 5 targets", done.stderr)


def test_each_line_is_prefixed_by_its_host_and_stderr_is_marked(web: Web) -> None:
    operator, hostnames = web.operator, web.hostnames
    command = 'echo "out of $TEST_HOSTNAME"; echo "err of $TEST_HOSTNAME" >&2; printf "no newline"'
    done = operator.ctl("run", "tag:web", "--", command)

    assert done.returncode == 0, done.stdout + done.stderr
    for hostname in hostnames:
        label = re.escape(hostname)
        assert re.search(rf"^{label} +\| out of {label}$", done.stdout, re.M), done.stdout
        assert re.search(rf"^{label} +\| no newline$", done.stdout, re.M)
        assert re.search(rf"^{label} +! err of {label}$", done.stderr, re.M), done.stderr
        assert "err of" not in done.stdout


def test_one_failing_target_makes_it_exit_1(web: Web) -> None:
    operator, hostnames = web.operator, web.hostnames
    failing = hostnames[2]
    done = operator.ctl("run", "tag:web", "--", f'test "$TEST_HOSTNAME" != {failing} || exit 3')

    assert done.returncode == 1, done.stdout + done.stderr
    rows = summary_rows(done.stdout)
    assert re.search(r"failed\s+│\s+3\s+│", rows[failing])
    assert sum("succeeded" in row for row in rows.values()) == 4
    assert "5 targets: 4 succeeded, 1 failed" in done.stdout


def test_json_is_the_final_run_with_each_targets_output(web: Web) -> None:
    operator, hostnames = web.operator, web.hostnames
    done = operator.ctl(
        "run",
        *hostnames[:2],
        "--max-concurrency",
        "50%",
        "--max-errors",
        "1",
        "--timeout",
        "20",
        "--json",
        "--",
        'echo "hi from $TEST_HOSTNAME"; echo warn >&2',
    )

    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "succeeded"
    # 50% of two targets: the run may keep the percentage or the count it stands for.
    assert run["max_concurrency"] in ("50%", 1)
    assert (run["max_errors"], run["timeout"]) == (1, 20)
    assert run["counts"]["total"] == 2 and run["counts"]["succeeded"] == 2
    by_host = {target["hostname"]: target for target in run["targets"]}
    assert set(by_host) == set(hostnames[:2])
    for hostname, target in by_host.items():
        assert target["stdout"] == f"hi from {hostname}\n"
        assert target["stderr"] == "warn\n"
        assert target["exit_code"] == 0


def test_json_of_a_failed_run_exits_1(web: Web) -> None:
    operator, hostnames = web.operator, web.hostnames
    done = operator.ctl("run", hostnames[0], "--json", "--", "exit 7")

    assert done.returncode == 1
    [target] = json.loads(done.stdout)["targets"]
    assert (target["status"], target["exit_code"]) == ("failed", 7)


def test_a_template_runs_with_its_values(web: Web) -> None:
    operator, hostnames = web.operator, web.hostnames
    status, template = operator.api.post(
        "/api/agents/command-templates/",
        {
            "name": "greet",
            "command": "echo hello {who} {loud}",
            "parameters": [
                {"name": "who", "type": "string", "required": True},
                {"name": "loud", "type": "boolean", "required": True},
            ],
        },
    )
    assert status == 201, template

    done = operator.ctl(
        "run", hostnames[0], "--template", "greet", "--param", "who=a b", "--param", "loud=yes"
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"^{re.escape(hostnames[0])} \| hello a b true$", done.stdout, re.M)


def test_a_wrong_token_prints_one_line_and_exits_2(web: Web) -> None:
    operator = web.operator
    done = operator.ctl("run", "tag:web", "--", "true", env={**operator.env, "TETHER_TOKEN": "x"})

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["tetherctl: authentication failed (401): Invalid token."]


def test_a_target_the_api_refuses_is_one_line_and_exit_2(operator: Operator) -> None:
    no_tag = operator.ctl("run", "tag:nobody-has-this", "--", "true")
    no_host = operator.ctl("run", "no-such-host", "--", "true")

    assert (no_tag.returncode, no_host.returncode) == (2, 2)
    assert no_tag.stderr.splitlines() == [
        "tetherctl: refused (400): targets: No agent of yours has the tag 'nobody-has-this'."
    ]
    assert no_host.stderr.splitlines() == [
        "tetherctl: not found (404): No such agent: no-such-host."
    ]


def test_usage_errors_exit_2_before_anything_is_sent(operator: Operator) -> None:
    for args, message in [
        (["run", "all"], "give a command after `--`"),
        (["run", "all", "--max-errors", "lots", "--", "true"], "--max-errors: give a number"),
        (["run", "all", "--template", "x", "--", "true"], "either a command after `--`"),
        (["run", "tags:web", "--", "true"], "not a target: 'tags:web'"),
    ]:
        done = operator.ctl(*args)

        assert done.returncode == 2, args
        assert message in done.stderr, (args, done.stderr)
    status, runs = operator.api.get("/api/runs/")
    assert status == 200 and runs["count"] == 0


def test_ctrl_c_cancels_the_run_it_started_and_exits_130(web: Web) -> None:
    operator = web.operator
    proc = subprocess.Popen(
        [str(TETHERCTL), "run", "tag:web", "--", "echo started; sleep 60"],
        env=operator.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: sum("| started" in line for line in seen) == 5, what="five started")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()

    assert proc.returncode == 130, stderr
    run_id = int(re.match(r"run (\d+):", stderr).group(1))
    assert f"interrupted: run {run_id} cancelled" in stderr

    def ended() -> dict | None:
        _, run = operator.api.get(f"/api/runs/{run_id}/")
        # The run and its targets are two reads: the last target's result may commit between
        # them (PostgreSQL runs the agents' results in parallel), so wait for both to be over.
        over = run["status"] != "running" and all(t["status"] in FINAL for t in run["targets"])
        return run if over else None

    run = wait_for(ended, timeout=30, what="every target killed")  # not the 60 s sleep
    assert run["status"] == "cancelled"
    assert {t["status"] for t in run["targets"]} == {"cancelled"}


def test_cancel_cancels_a_run_by_id(web: Web) -> None:
    operator = web.operator
    status, run = operator.api.post(
        "/api/runs/", {"command": "sleep 60", "targets": {"tags": ["web"]}}
    )
    assert status == 201, run

    done = operator.ctl("cancel", str(run["id"]))

    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"run {run['id']}: cancel"), done.stderr

    def cancelled() -> bool:
        return operator.api.get(f"/api/runs/{run['id']}/")[1]["status"] == "cancelled"

    wait_for(cancelled, timeout=30, what="run cancelled")
    again = operator.ctl("cancel", str(run["id"]))
    assert again.returncode == 2
    assert again.stderr.startswith("tetherctl: conflict (409): ")


def test_more_than_five_targets_get_a_progress_bar_on_a_terminal(web: Web) -> None:
    controller, terminal = pty.openpty()
    env = {k: v for k, v in web.operator.env.items() if k != "NO_COLOR"}
    proc = subprocess.Popen(
        [str(TETHERCTL), "run", "tag:web", "tag:db", "--", "echo hello"],
        env=env,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
    )
    os.close(terminal)
    screen = b""
    try:
        while chunk := read_terminal(controller):
            screen += chunk
        proc.wait(timeout=30)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode())

    assert proc.returncode == 0, text
    assert re.search(r"━+ 6/6 done", text), text
    assert text.count("| hello") == 6
    # Each host's line starts a line of its own: the bar is cleared before it is printed.
    starts = [line.split(" | ")[0] for line in hello_lines(text)]
    assert all(start.startswith(("web-", "db-")) for start in starts), starts


def read_terminal(fd: int) -> bytes:
    """What the program wrote to its terminal, or nothing once it has closed it."""
    ready, _, _ = select.select([fd], [], [], 60)
    if not ready:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other side is closed
        return b""


def hello_lines(text: str) -> list[str]:
    """The lines that show `hello`, as the terminal ends up showing them (after any `\r`)."""
    lines = text.replace("\r\n", "\n").split("\n")
    return [line.rsplit("\r", 1)[-1] for line in lines if "| hello" in line]
