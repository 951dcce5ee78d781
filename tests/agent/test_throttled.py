"""A throttled poll (429) waits as long as the server's Retry-After says, within reason."""

from tests.agent.test_manifest import load_agent

agent = load_agent()


def answer(retry_after: str | None) -> object:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return agent.Response(429, {"error": {"code": "throttled"}}, headers, b"")


def test_it_reads_retry_after() -> None:
    assert agent.retry_after(answer("17")) == 17


def test_it_caps_and_ignores_nonsense() -> None:
    assert agent.retry_after(answer("99999")) == 300
    assert agent.retry_after(answer("soon")) == 0
    assert agent.retry_after(answer("-5")) == 0
    assert agent.retry_after(answer(None)) == 0
