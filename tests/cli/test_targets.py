"""How a command line names its targets, and the `targets` object of a run it becomes."""

import pytest

from tether_cli.errors import CliError
from tether_cli.targets import Targets, parse_targets


def test_it_sorts_ids_hostnames_tags_servers_and_all() -> None:
    targets = parse_targets(["web-1", "12", "tag:web", "server:4", "all", "db.example.com"])

    assert targets == Targets(
        agents=["web-1", 12, "db.example.com"], tags=["web"], servers=[4], all=True
    )
    assert targets.as_body() == {
        "agents": ["web-1", 12, "db.example.com"],
        "tags": ["web"],
        "servers": [4],
        "all": True,
    }


def test_the_body_holds_only_the_parts_given() -> None:
    assert parse_targets(["tag:web", "tag:db"]).as_body() == {"tags": ["web", "db"]}
    assert parse_targets(["all"]).as_body() == {"all": True}
    assert parse_targets(["7"]).as_body() == {"agents": [7]}


def test_it_names_each_target_once() -> None:
    assert parse_targets(["web-1", "web-1", "3", "3", "tag:a", "tag:a"]).as_body() == {
        "agents": ["web-1", 3],
        "tags": ["a"],
    }


@pytest.mark.parametrize(
    "word", ["tag:", "tags:web", "server:x", "server:", "-x", "", "host:web-1", "12:30"]
)
def test_it_refuses_what_is_not_a_target(word: str) -> None:
    with pytest.raises(CliError, match="not a target"):
        parse_targets([word])


def test_it_wants_at_least_one_target() -> None:
    with pytest.raises(CliError, match="name at least one target"):
        parse_targets([])
