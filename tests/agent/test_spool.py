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
        offset, dropped, data, _ = journal.read_spool(run, stream, run.acked[stream], size)
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


def test_bytes_lost_to_a_full_disk_are_one_declared_gap(tmp_path: Path) -> None:
    journal, run = spool(tmp_path)
    w = writer(journal, run)
    w.write("stdout", b"before\n")
    real_write = agent.os.write
    agent.os.write = lambda fd, data: (_ for _ in ()).throw(OSError(28, "No space left"))
    try:
        for _ in range(1000):  # each read of the pipe fails: no file is left for any of them
            w.write("stdout", b"x" * 4096)
    finally:
        agent.os.write = real_write
    w.write("stdout", b"after\n")
    w.close()

    calls = send_all(journal, run)

    lost = 1000 * 4096
    assert calls == [(0, 0, b"before\n"), (7 + lost, lost, b"after\n")]
    assert run.stored["stdout"] == 13 + lost and run.dropped == lost
    assert len(list((tmp_path / "out").iterdir())) == 2


def sender_of(journal: object) -> object:
    """The agent's sender, without its thread and its HTTP client."""
    sender = agent.Sender.__new__(agent.Sender)
    sender.journal = journal
    sender.event = SimpleNamespace(set=lambda: None)
    return sender


def test_text_cut_at_every_file_boundary_streams_whole(tmp_path: Path) -> None:
    """A character across the head's end or a tail file's end: the sender carries on across
    files that follow each other, so it is neither held back for ever nor split."""
    journal, run = spool(tmp_path)
    text = ("x" + "€" * 20000 + "\nerror: ü\n").encode()
    writer(journal, run).write("stdout", text)
    sender = sender_of(journal)
    sent = []
    for _ in range(200):
        fields, reach = sender.build_output(run, final=False)
        if reach == run.acked:
            break
        assert fields["encoding"] == "utf-8", "a character was split"
        sent.append((fields["offset_stdout"], fields.get("dropped_stdout", 0), fields["stdout"]))
        run.acked.update(reach)

    assert run.acked["stdout"] == len(text)
    assert sent[0][0] == 0 and sent[0][2].startswith("x€€")
    assert "".join(part for _, _, part in sent).endswith("€€\nerror: ü\n")


def test_a_character_cut_by_a_gap_is_sent_as_is(tmp_path: Path) -> None:
    journal, run = spool(tmp_path)
    w = writer(journal, run)
    w.write("stdout", "ok €".encode()[:-1])  # the character's last byte never reached the disk
    w.close()
    run.stored["stdout"] += 1
    sender = sender_of(journal)

    fields, reach = sender.build_output(run, final=False)
    run.acked.update(reach)
    then, _ = sender.build_output(run, final=False)

    assert (reach["stdout"], fields["encoding"]) == (5, "base64")  # not held back for ever
    assert (then["offset_stdout"], then["dropped_stdout"], then["stdout"]) == (6, 1, "")


def test_the_result_goes_once_the_output_is_sent(tmp_path: Path) -> None:
    journal, run = spool(tmp_path)
    w = writer(journal, run)
    w.write("stdout", ("x" + "€" * 20000).encode())  # within the window: no gap
    w.close()
    run.entry.update(state="done", result={"status": "succeeded"})
    run.acknowledged = True
    sender = sender_of(journal)
    calls = []

    def post(run: object, kind: str, body: dict) -> object:
        calls.append(kind)
        return SimpleNamespace(status=200, data={})

    sender.post = post
    sender.mark_reported = lambda run: calls.append("reported")
    for _ in range(100):
        if calls and calls[-1] == "reported":
            break
        sender.send_result(run)

    assert calls[-2:] == ["result", "reported"] and len(calls) < 10, calls


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


def test_a_server_that_takes_no_holes_gets_the_result_without_them(tmp_path: Path) -> None:
    """A server of an earlier release refuses a declared hole (409, its end where the hole
    starts): the agent reports what the server has instead of asking again for ever."""
    journal, run = spool(tmp_path)
    w = writer(journal, run)
    w.write("stdout", b"head\n")
    w.close()
    run.stored["stdout"] += 100  # lost to a full disk
    run.entry.update(state="done", result={"status": "failed", "exit_code": 1})
    run.acknowledged = True
    run.acked["stdout"] = 5
    sender = sender_of(journal)
    bodies = []

    def post(run: object, kind: str, body: dict) -> object:
        bodies.append((kind, body))
        if "dropped_stdout" in body:
            gap = {"code": "offset_gap", "expected": {"stdout": 5, "stderr": 0}}
            return SimpleNamespace(status=409, data={"error": gap}, error_code=lambda: gap["code"])
        return SimpleNamespace(status=200, data={})

    sender.post = post
    sender.mark_reported = lambda run: bodies.append(("reported", {}))
    for _ in range(5):
        sender.send_result(run)
        if bodies[-1][0] == "reported":
            break

    kinds = [kind for kind, _ in bodies]
    assert kinds == ["result", "result", "reported"], kinds
    assert bodies[1][1]["stdout_size"] == 5 and "stdout" not in bodies[1][1]
