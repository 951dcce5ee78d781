"""`tetherctl upgrade TARGET...`: one upgrade per agent named, a table, exit 1 on a refusal."""

import pytest

from tests.cli.conftest import Operator, unique

pytestmark = pytest.mark.e2e


def rows(stdout: str) -> dict[str, str]:
    """Table rows by hostname."""
    return {line.split("│")[2].strip(): line for line in stdout.splitlines() if "│" in line}


def test_it_starts_an_upgrade_of_each_agent_and_exits_0(operator: Operator) -> None:
    first, second = unique("web"), unique("web")
    fleets = operator.hosts(first, second, tags=("web",))

    done = operator.ctl("upgrade", "tag:web")

    assert done.returncode == 0, done.stderr
    table = rows(done.stdout)
    for hostname in (first, second):
        assert "started" in table[hostname] and "agent" in table[hostname], done.stdout
    for fleet in fleets:
        status, deployments = operator.api.get(f"/api/agents/{fleet.agent_id}/deployments/")
        assert status == 200
        assert [d["kind"] for d in deployments] == ["upgrade"]
        assert str(deployments[0]["id"]) in table[operator.agent(fleet.agent_id)["hostname"]]


def test_a_refused_upgrade_is_shown_and_exits_1(operator: Operator) -> None:
    online, offline = unique("up"), unique("down")
    operator.hosts(online)
    [gone] = operator.hosts(offline)
    operator.stop_agent(gone)

    done = operator.ctl("upgrade", online, str(gone.agent_id))

    assert done.returncode == 1, done.stderr
    table = rows(done.stdout)
    assert "started" in table[online]
    assert "refused: conflict (409)" in table[offline] and "SSH private key" in table[offline]


def test_a_target_that_names_no_agent_is_an_error_and_nothing_starts(operator: Operator) -> None:
    [fleet] = operator.hosts(unique("web"))

    done = operator.ctl("upgrade", str(fleet.agent_id), "tag:nothing-has-this")

    assert done.returncode == 2
    assert done.stderr.splitlines() == ["tetherctl: no agent matches tag:nothing-has-this"]
    status, deployments = operator.api.get(f"/api/agents/{fleet.agent_id}/deployments/")
    assert deployments == []
