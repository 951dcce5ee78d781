"""`tetherctl status AGENT`: the agent's RPC endpoint asked through the server."""

import json
import re
from pathlib import Path

import pytest

from tests.cli.conftest import Operator, unique
from tests.conftest import AGENT

pytestmark = pytest.mark.e2e


def test_it_reports_a_reachable_agent_by_hostname_then_a_stopped_one(operator: Operator) -> None:
    hostname = unique("web")
    [fleet] = operator.hosts(hostname, rpc=True)
    version = re.search(r'^__version__ = "([^"]+)"', AGENT.read_text(), re.M).group(1)

    done = operator.ctl("status", hostname)

    assert done.returncode == 0, done.stderr
    assert re.search(r"reachable\s+yes", done.stdout), done.stdout
    assert re.search(rf"version\s+{re.escape(version)}", done.stdout)
    assert re.search(r"latency\s+\d+ ms", done.stdout)

    fleet.agent_proc.kill()
    by_id = operator.ctl("status", str(fleet.agent_id), "--json")

    assert by_id.returncode == 1
    answer = json.loads(by_id.stdout)
    assert answer["agent"] == fleet.agent_id and answer["reachable"] is False
    assert "refused" in answer["error"]


def test_a_hostname_on_several_servers_is_an_error_that_lists_them(operator: Operator) -> None:
    hostname = unique("twin")
    fleets = operator.hosts(hostname, hostname)

    done = operator.ctl("status", hostname)

    assert done.returncode == 2
    ids = ", ".join(str(f.agent_id) for f in sorted(fleets, key=lambda f: f.agent_id))
    assert done.stderr.splitlines() == [
        f"tetherctl: 2 agents have hostname '{hostname}' (ids {ids}): give an id"
    ]


def test_an_unknown_agent_is_an_error(operator: Operator) -> None:
    by_name = operator.ctl("status", "no-such-host")
    by_id = operator.ctl("status", "999999")

    assert (by_name.returncode, by_id.returncode) == (2, 2)
    assert by_name.stderr.splitlines() == ["tetherctl: no agent has hostname 'no-such-host'"]
    assert by_id.stderr.splitlines() == ["tetherctl: no agent 999999 (not found, or not yours)"]


def test_another_users_agent_is_not_found(operator: Operator, tmp_path: Path) -> None:
    someone_else = Operator(operator.tether, tmp_path / "else")
    try:
        hostname = unique("theirs")
        [theirs] = someone_else.hosts(hostname)

        by_id = operator.ctl("status", str(theirs.agent_id))
        by_name = operator.ctl("status", hostname)
    finally:
        someone_else.close()

    assert (by_id.returncode, by_name.returncode) == (2, 2)
    assert "not found, or not yours" in by_id.stderr
    assert "no agent has hostname" in by_name.stderr
