"""A network cut longer than the lease, through a proxy the test controls: first the answers
are lost (the server acts on requests the agent never hears back from), then nothing gets
through at all, then the network comes back. No command runs twice, no byte is lost or
doubled, and every command ends in the state the agent saw."""

import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from tests.conftest import Api, Fleet, TetherServer, wait_for
from tests.faults.conftest import (
    FAULT_ENV,
    FaultProxy,
    assert_output,
    fault_survived,
    gated,
    numbered,
    runs,
    start_agent,
    stored_output,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

LEASE = float(FAULT_ENV["TETHER_COMMAND_LEASE"])


@pytest.fixture(scope="module")
def cut(
    fault_server: TetherServer, fault_api: Api, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """The fault, once for the tests below: a command streaming across the cut (`first`) and
    one handed out while answers are lost (`second`)."""
    tmp = tmp_path_factory.mktemp("cut")
    fleet = Fleet(fault_server, fault_api, tmp)
    proxy = FaultProxy(fault_server.port)
    try:
        agent = start_agent(fleet, url=proxy.url)
        m1, m2 = tmp / "first.txt", tmp / "second.txt"
        gates = [tmp / "gate-b", tmp / "gate-c"]
        first = fleet.send(gated(m1, [("a", 100), ("b", 100), ("c", 100)], gates))
        wait_for(
            lambda: stored_output(fault_server, first["id"]) == numbered("a", 1, 100),
            what="the first part stored",
        )

        # 1. Answers lost: a command delivered to the agent's held poll never reaches it, and
        #    output the server stores is never acknowledged (so the agent sends it again).
        proxy.set_mode("blackhole")
        wait_for(
            lambda: any(r.startswith("blackhole GET /api/agents/poll") for r in proxy.requests),
            what="a poll held through the blackhole",
        )
        second = fleet.send(f"echo run >> {m2}; echo second")
        wait_for(
            lambda: fleet.command(second["id"])["status"] == "delivered",
            what="the second command handed out",
        )
        gates[0].touch()
        two_parts = numbered("a", 1, 100) + numbered("b", 1, 100)
        wait_for(
            lambda: stored_output(fault_server, first["id"]) == two_parts,
            what="the second part stored, its answer lost",
        )

        # 2. Cut: every connection closed, new ones refused, for longer than the lease, until
        #    the server has given up on the agent (offline) and on its running command (lost).
        proxy.set_mode("cut")
        cut_at = time.monotonic()
        gates[1].touch()  # the command ends while the agent cannot report it
        wait_for(
            lambda: fleet.command(first["id"])["status"] == "lost",
            timeout=20,
            what="the running command marked lost while the agent is away",
        )
        assert time.monotonic() - cut_at > LEASE
        assert agent.proc.poll() is None, "the agent should survive the cut"

        # 3. Restored: the agent resends what the server has not acknowledged, its result
        #    replaces `lost`; a delivery it never received is due again.
        proxy.set_mode("open")
        first_done = wait_for(
            lambda: (c := fleet.command(first["id"]))["status"] not in ("lost", "running") and c,
            timeout=30,
            what="the agent's result after the cut",
        )
        second_done = fleet.wait_final(second["id"], timeout=30)
        # A redelivery comes with the agent's first polls: give it the time to run once more.
        fleet.run("true")
        yield SimpleNamespace(
            server=fault_server,
            first=first_done,
            second=second_done,
            markers=(m1, m2),
            deliveries=fault_server.sql(
                "SELECT delivery_count FROM commands_command WHERE id = ?", second["id"]
            )[0][0],
        )
    finally:
        proxy.close()
        if fleet.agent_proc and fleet.agent_proc.proc.poll() is None:
            fleet.agent_proc.kill()


def test_a_cut_longer_than_the_lease_loses_and_doubles_nothing(cut: SimpleNamespace) -> None:
    assert cut.first["status"] == "succeeded", cut.first
    expected = numbered("a", 1, 100) + numbered("b", 1, 100) + numbered("c", 1, 100)
    assert_output(cut.server, cut.first["id"], expected)
    assert runs(cut.markers[0]) == 1
    assert runs(cut.markers[1]) <= 1
    fault_survived()


def test_a_delivery_lost_in_the_cut_is_delivered_again(cut: SimpleNamespace) -> None:
    assert cut.second["status"] == "succeeded", cut.second
    assert cut.second["stdout"] == "second\n"
    assert cut.deliveries >= 2
    assert runs(cut.markers[1]) == 1
