"""The agent's output spool on its own: a head and a rolling tail on bounded disk, and what
the sender reads back from it (bytes at their offsets, and each gap declared with its exact
size). tests/faults/test_output_beyond_spool.py and test_disk_full.py drive the same with a
real agent and server."""

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.agent.test_manifest import load_agent

agent = load_agent()

WINDOW = 4 * agent.MIN_SEGMENT_BYTES  # per stream: head 2 segments, tail 2 segments


def spool(tmp_path: Path) -> tuple[object, object]:
    """A journal, and a run whose spool keeps WINDOW bytes of each stream."""
    journal = agent.Journal(str(tmp_path))
    run = agent.Run({"id": "c1", "state": "started", "max_output_bytes": 2 * WINDOW})
    journal.add(run)
    return journal, run


def writer(journal: object, run: object) -> object:
    wakes = SimpleNamespace(wake=lambda: None)
    return agent.SpoolWriter(SimpleNamespace(journal=journal, sender=wakes), run)


def send_all(
    journal: object, run: object, stream: str = "stdout", size: int = 5000, skips: list = None
) -> list:
    """What the sender would send, call after call: (offset, dropped, bytes). A declared
    hole may reach back over bytes sent already; `skips` gets what a server, which has every
    byte up to the acknowledged end, counts dropped: the stretch from that end to the offset."""
    calls = []
    while run.acked[stream] < run.stored[stream]:
        offset, dropped, data = journal.read_spool(run, stream, run.acked[stream], size)
        assert offset >= run.acked[stream] and offset - dropped <= run.acked[stream]
        if skips is not None:
            skips.append(offset - run.acked[stream])
        calls.append((offset, dropped, data))
        run.acked[stream] = offset + len(data)
    return calls


def disk(tmp_path: Path) -> int:
    return sum(f.stat().st_size for f in (tmp_path / "out").iterdir())


def test_output_within_the_window_is_kept_whole(tmp_path: Path) -> None:
    journal, run = spool(tmp_path)
    data = random.Random(1).randbytes(WINDOW)
    w = writer(journal, run)
    for i in range(0, len(data), 1000):
        w.write("stdout", data[i : i + 1000])
    w.close()

    calls = send_all(journal, run)

    assert b"".join(c[2] for c in calls) == data
    assert all(dropped == 0 for _, dropped, _ in calls) and run.dropped == 0


def test_unsent_output_past_the_window_keeps_head_and_tail_on_bounded_disk(
    tmp_path: Path,
) -> None:
    journal, run = spool(tmp_path)
    data = random.Random(2).randbytes(40 * WINDOW)
    w = writer(journal, run)
    largest = 0
    for i in range(0, len(data), 4096):
        w.write("stdout", data[i : i + 4096])
        largest = max(largest, disk(tmp_path))
    w.close()

    calls = send_all(journal, run)

    assert largest <= WINDOW + agent.MIN_SEGMENT_BYTES
    assert run.stored["stdout"] == len(data)
    got, end, dropped = bytearray(), 0, 0
    for offset, hole, chunk in calls:
        assert offset - hole == end or (hole == 0 and offset == end)
        dropped += hole
        got += chunk
        end = offset + len(chunk)
    assert end == len(data) and len(got) + dropped == len(data)
    assert got.startswith(data[: WINDOW // 2]) and got.endswith(data[-WINDOW // 2 :])
    assert run.dropped == dropped


def test_a_sender_that_keeps_up_gets_every_byte(tmp_path: Path) -> None:
    journal, run = spool(tmp_path)
    data = random.Random(3).randbytes(20 * WINDOW)
    w = writer(journal, run)
    calls = []
    for i in range(0, len(data), 4096):
        w.write("stdout", data[i : i + 4096])
        calls += send_all(journal, run)
    w.close()

    assert b"".join(c[2] for c in calls) == data
    assert run.dropped == 0


@pytest.mark.parametrize("seed", range(8))
def test_any_interleaving_declares_exactly_what_it_drops(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    journal, run = spool(tmp_path)
    w = writer(journal, run)
    data = bytearray()
    received: dict[int, int] = {}  # offset -> byte, as a server would store them
    skips: list[int] = []
    for _ in range(300):
        chunk = rng.randbytes(rng.randrange(1, 3000))
        w.write("stdout", chunk)
        data += chunk
        if rng.random() < 0.2:
            size = rng.randrange(1, 9000)
            for offset, _, part in send_all(journal, run, size=size, skips=skips):
                received.update((offset + i, b) for i, b in enumerate(part))
    w.close()
    for offset, _, part in send_all(journal, run, skips=skips):
        received.update((offset + i, b) for i, b in enumerate(part))

    assert all(data[offset] == byte for offset, byte in received.items())
    assert len(received) + sum(skips) == len(data)
    assert run.dropped == sum(skips)
    assert all(offset in received for offset in range(len(data) - WINDOW // 2, len(data)))


def test_a_restarted_agent_finds_the_spool_as_it_was(tmp_path: Path) -> None:
    journal, run = spool(tmp_path)
    data = random.Random(4).randbytes(10 * WINDOW)
    w = writer(journal, run)
    for i in range(0, len(data), 4096):
        w.write("stdout", data[i : i + 4096])
    w.close()

    again = agent.Run(dict(run.entry, result={"stdout_size": len(data)}))
    again.segments["stdout"] = journal.load_segments("c1", "stdout")

    assert again.segments["stdout"] == run.segments["stdout"]
    assert send_all(journal, again) == send_all(journal, run)


def test_bytes_lost_to_a_full_disk_are_a_declared_gap(tmp_path: Path) -> None:
    journal, run = spool(tmp_path)
    w = writer(journal, run)
    w.write("stdout", b"before\n")
    real_write = agent.os.write
    agent.os.write = lambda fd, data: (_ for _ in ()).throw(OSError(28, "No space left"))
    try:
        w.write("stdout", b"lost\n")
    finally:
        agent.os.write = real_write
    w.write("stdout", b"after\n")
    w.close()

    calls = send_all(journal, run)

    assert calls == [(0, 0, b"before\n"), (12, 5, b"after\n")]
    assert run.stored["stdout"] == 18 and run.dropped == 5


def test_a_loss_at_the_end_is_declared_at_the_end(tmp_path: Path) -> None:
    journal, run = spool(tmp_path)
    w = writer(journal, run)
    w.write("stdout", b"before\n")
    w.close()
    run.stored["stdout"] += 9  # the disk filled up for the command's last bytes

    assert send_all(journal, run) == [(0, 0, b"before\n"), (16, 9, b"")]


def test_prune_keeps_the_spool_of_a_command_still_reported(tmp_path: Path) -> None:
    journal, run = spool(tmp_path)
    w = writer(journal, run)
    w.write("stdout", bytes(20 * WINDOW))
    w.close()
    (tmp_path / "out" / "gone.stdout.99").write_bytes(b"x")
    before = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("c1."))

    journal.prune()

    after = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert after == before and len(before) > 2
    journal.delete_spool("c1")
    assert not list((tmp_path / "out").iterdir())
