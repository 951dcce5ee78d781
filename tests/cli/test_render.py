"""What the operator sees: one line per refusal, output prefixed by host and kept as it came."""

import pytest

from tether_cli import render


def test_an_error_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    render.error("authentication failed (401): Invalid token.")

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "tetherctl: authentication failed (401): Invalid token.\n"


def test_output_is_prefixed_by_host_and_stderr_is_marked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    printer = render.RunOutput({1: "web-1", 2: "db-10"})

    printer.line(1, "web-1", "stdout", "a\tb [bold]not markup[/bold]")
    printer.line(2, "db-10", "stderr", "oops")

    captured = capsys.readouterr()
    assert captured.out == "web-1 | a\tb [bold]not markup[/bold]\n"
    assert captured.err == "db-10 ! oops\n"


def test_ages_are_short() -> None:
    assert render.age(None) == "never"
    assert render.age("2000-01-01T00:00:00Z").endswith("d ago")
    assert render.age("not a date") == "not a date"
