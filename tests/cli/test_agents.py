"""`tetherctl agents` and `tetherctl templates` against a real server."""

import json

import pytest

from tests.cli.conftest import Operator, unique

pytestmark = pytest.mark.e2e


def test_it_lists_the_agents_in_a_table(operator: Operator) -> None:
    web, db = unique("web"), unique("db")
    operator.hosts(web, tags=("web", "eu"))
    operator.hosts(db)

    done = operator.ctl("agents")

    assert done.returncode == 0, done.stderr
    assert "2 agents" in done.stdout
    rows = {line.split("│")[2].strip(): line for line in done.stdout.splitlines() if "│" in line}
    assert set(rows) >= {web, db}
    assert "online" in rows[web] and "web, eu" in rows[web]
    assert "s ago" in rows[web]


def test_it_filters_by_status_and_tag_and_prints_json(operator: Operator) -> None:
    web, db = unique("web"), unique("db")
    [web_fleet] = operator.hosts(web, tags=("web",))
    [db_fleet] = operator.hosts(db)

    tagged = operator.ctl("agents", "--tag", "web", "--json")
    assert tagged.returncode == 0, tagged.stderr
    assert [(a["id"], a["hostname"]) for a in json.loads(tagged.stdout)] == [
        (web_fleet.agent_id, web)
    ]

    operator.stop_agent(db_fleet)
    offline = json.loads(operator.ctl("agents", "--status", "offline", "--json").stdout)
    assert [a["id"] for a in offline] == [db_fleet.agent_id]


def test_a_status_the_api_does_not_know_is_one_line_and_exit_2(operator: Operator) -> None:
    done = operator.ctl("agents", "--status", "sleepy")

    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "tetherctl: refused (400): status: must be one of "
        "['pending', 'online', 'offline', 'stopped', 'upgrading']"
    ]


def test_it_lists_the_command_templates(operator: Operator) -> None:
    status, template = operator.api.post(
        "/api/agents/command-templates/",
        {
            "name": "restart",
            "command": "systemctl restart {unit}",
            "parameters": [{"name": "unit", "type": "string", "required": True}],
            "timeout": 30,
        },
    )
    assert status == 201, template

    table = operator.ctl("templates")
    assert table.returncode == 0, table.stderr
    assert "restart" in table.stdout and "systemctl restart {unit}" in table.stdout
    assert "unit:string" in table.stdout and "30s" in table.stdout

    listed = operator.ctl("templates", "--json")
    assert [t["id"] for t in json.loads(listed.stdout)] == [template["id"]]
