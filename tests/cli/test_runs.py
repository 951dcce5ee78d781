"""The pure parts of `tetherctl run`: the request body from the command line, output cut into
lines per host and stream, labels, and what counts as success."""

import pytest

from tether_cli.errors import CliError
from tether_cli.runs import (
    OutputLines,
    all_succeeded,
    command_fields,
    labels_for,
    parse_limit,
    parse_params,
)


def test_the_words_after_dashes_are_one_command_line() -> None:
    assert command_fields(["uname", "-a"]) == {"command": "uname -a"}
    assert command_fields(["df -h | grep /srv"]) == {"command": "df -h | grep /srv"}


def test_an_empty_command_is_refused() -> None:
    with pytest.raises(CliError, match="give a command after `--`"):
        command_fields([])
    with pytest.raises(CliError, match="give a command after `--`"):
        command_fields(["  "])


@pytest.mark.parametrize(("text", "value"), [("5", 5), ("0", 0), ("20%", "20%"), (None, None)])
def test_limits_are_numbers_or_percentages(text: str | None, value: object) -> None:
    assert parse_limit(text, "--max-errors") == value


@pytest.mark.parametrize("text", ["-1", "5.5", "%", "ten", "20 %"])
def test_other_limits_are_refused(text: str) -> None:
    with pytest.raises(CliError, match="--max-concurrency: give a number or a percentage"):
        parse_limit(text, "--max-concurrency")


def test_params_are_name_value_pairs() -> None:
    assert parse_params(["unit=nginx", "args=a=b", "empty="]) == {
        "unit": "nginx",
        "args": "a=b",
        "empty": "",
    }
    with pytest.raises(CliError, match="--param takes NAME=VALUE"):
        parse_params(["unit"])


def output(command: int, stream: str, offset: int, data: str, host: str = "web-1") -> dict:
    return {
        "command": command,
        "agent": command + 100,
        "hostname": host,
        "stream": stream,
        "offset": offset,
        "data": data,
    }


def test_output_is_cut_into_whole_lines_per_command_and_stream() -> None:
    lines = OutputLines()

    assert lines.feed(output(1, "stdout", 0, "one\ntw")) == [(101, "web-1", "stdout", "one")]
    assert lines.feed(output(2, "stdout", 0, "other\r\n", "web-2")) == [
        (102, "web-2", "stdout", "other")
    ]
    assert lines.feed(output(1, "stderr", 0, "err")) == []
    assert lines.feed(output(1, "stdout", 6, "o\nthree")) == [(101, "web-1", "stdout", "two")]
    assert lines.flush(1) == [
        (101, "web-1", "stdout", "three"),
        (101, "web-1", "stderr", "err"),
    ]
    assert lines.flush() == []


def test_output_repeated_by_a_new_stream_is_dropped() -> None:
    lines = OutputLines()
    lines.feed(output(1, "stdout", 0, "a\n"))
    lines.feed(output(1, "stdout", 2, "b\n"))

    # The stream was opened again: it starts from the beginning.
    assert lines.feed(output(1, "stdout", 0, "a\n")) == []
    assert lines.feed(output(1, "stdout", 2, "b\n")) == []
    assert lines.feed(output(1, "stdout", 4, "c\n")) == [(101, "web-1", "stdout", "c")]


def test_labels_are_hostnames_made_unique_with_the_agent_id() -> None:
    targets = [
        {"agent": 1, "hostname": "web-1"},
        {"agent": 2, "hostname": "db"},
        {"agent": 3, "hostname": "db"},
    ]
    assert labels_for(targets) == {1: "web-1", 2: "db#2", 3: "db#3"}


def test_a_run_succeeds_only_when_every_target_did() -> None:
    ok = {"status": "succeeded", "targets": [{"status": "succeeded"}] * 2}
    skipped = {"status": "failed", "targets": [{"status": "succeeded"}, {"status": "skipped"}]}

    assert all_succeeded(ok)
    assert not all_succeeded(skipped)
    assert not all_succeeded({"status": "cancelled", "targets": []})
