"""Output past the cap as every reader shows it: the head, one marker line saying how many
bytes were dropped, then the tail (docs/agent-protocol.md, Output limits)."""

import asyncio
import json

from asgiref.sync import sync_to_async
from django.test import Client, override_settings

from tether.commands import services
from tether.commands.api.run_stream import run_events
from tether.commands.api.stream import _events
from tether.commands.models import Command
from tether.commands.output import Chunk, dropped_marker, output_text
from tether.commands.reports import Result
from tether.fleet import services as fleet_services

from ..base import BaseTestCase


@override_settings(MAX_OUTPUT_BYTES=8, POLL_RECHECK=0.05)
class OutputLimitsTestCase(BaseTestCase):
    def progress(self, command: Command, data: bytes, offset: int) -> None:  # type: ignore[override]
        services.record_progress(
            agent=self.agent, command_id=command.pk, chunks=[Chunk("stdout", data, offset)]
        )

    def finish(self, command: Command) -> None:
        services.record_result(
            agent=self.agent, command_id=command.pk, result=Result(status="failed", exit_code=2)
        )

    def test_the_api_shows_head_marker_tail_and_the_counts(self) -> None:
        command = self.running("make")
        self.progress(command, b"make: building\n", 0)
        self.progress(command, b"make: error\n", 15)  # 27 bytes: 19 dropped

        body = self.read(command.pk)

        self.assertEqual(body["stdout"], "make" + dropped_marker(19) + "ror\n")
        self.assertEqual((body["stdout_dropped"], body["stderr_dropped"]), (19, 0))
        self.assertTrue(body["truncated"])
        listed = self.client.get(f"/api/agents/{self.agent.pk}/commands/").json()
        self.assertEqual(listed[0]["stdout_dropped"], 19)

    def test_the_console_page_and_the_download_show_the_marker(self) -> None:
        command = self.running("make")
        self.progress(command, b"make: building\n", 0)
        self.progress(command, b"make: ... error\n", 15)
        self.finish(command)
        browser = Client()
        browser.force_login(self.alice)

        page = browser.get(f"/commands/{command.pk}/")
        raw = browser.get(f"/commands/{command.pk}/stdout.txt")

        self.assertContains(page, "[... 23 bytes dropped ...]")
        self.assertContains(page, "stdout 23 bytes")
        self.assertEqual(raw.content, ("make" + dropped_marker(23) + "ror\n").encode())

    async def test_the_command_stream_marks_what_it_did_not_read_in_time(self) -> None:
        command = await sync_to_async(self.running)("make")
        events = _events(command.pk)
        await sync_to_async(self.progress)(command, b"make", 0)
        first = await self.next_output(events)
        # 27 bytes arrive while the client looks away: 23 of them are dropped before it reads.
        await sync_to_async(self.progress)(command, b": it all went wrong; e", 4)
        await sync_to_async(self.progress)(command, b"rror\n", 26)
        await sync_to_async(self.finish)(command)
        rest = [data async for name, data in self.frames(events) if name == "output"]

        self.assertEqual(first["data"], "make")
        self.assertEqual(
            rest[0], {"stream": "stdout", "offset": 4, "data": dropped_marker(23), "dropped": 23}
        )
        self.assertEqual(
            "".join(e["data"] for e in [first, *rest]),
            await sync_to_async(output_text)(await self.reload(command), "stdout"),
        )

    async def test_a_client_that_joins_late_sees_the_api_text(self) -> None:
        command = await sync_to_async(self.running)("make")
        await sync_to_async(self.progress)(command, b"make: it went wrong: ", 0)
        await sync_to_async(self.progress)(command, b"error\n", 21)
        await sync_to_async(self.finish)(command)

        got = [
            data
            async for name, data in self.frames(_events(command.pk))
            if name in ("output", "end")
        ]

        self.assertEqual(
            "".join(e["data"] for e in got[:-1]), "make" + dropped_marker(19) + "ror\n"
        )
        self.assertEqual(got[-1]["stdout_dropped"], 19)

    async def test_both_streams_mark_bytes_the_agent_lost_at_the_end(self) -> None:
        # The agent's disk filled up: it declares the stream's last 10 bytes dropped.
        await sync_to_async(fleet_services.record_heartbeat)(agent=self.agent)
        response = await sync_to_async(self.client.post)(
            "/api/runs/", {"command": "make", "targets": {"agents": ["web-1"]}}, format="json"
        )
        command = await Command.objects.aget(run_id=response.json()["id"])
        await sync_to_async(self.deliver)()
        await sync_to_async(self.progress)(command, b"ok", 0)
        await sync_to_async(services.record_progress)(
            agent=self.agent, command_id=command.pk, chunks=[Chunk("stdout", b"", 12, dropped=10)]
        )
        await sync_to_async(self.finish)(command)

        single = [d async for n, d in self.frames(_events(command.pk)) if n == "output"]
        fleet = [d async for n, d in self.frames(run_events(command.run_id)) if n == "output"]

        expected = "ok" + dropped_marker(10)
        self.assertEqual(
            expected, await sync_to_async(output_text)(await self.reload(command), "stdout")
        )
        self.assertEqual("".join(e["data"] for e in single), expected)
        self.assertEqual("".join(e["data"] for e in fleet), expected)
        self.assertEqual((single[-1]["offset"], single[-1]["dropped"]), (2, 10))
        self.assertEqual((fleet[-1]["offset"], fleet[-1]["dropped"]), (2, 10))

    async def test_the_run_stream_marks_the_hole_and_sends_the_tail(self) -> None:
        await sync_to_async(fleet_services.record_heartbeat)(agent=self.agent)
        response = await sync_to_async(self.client.post)(
            "/api/runs/", {"command": "make", "targets": {"agents": ["web-1"]}}, format="json"
        )
        run = response.json()
        command = await Command.objects.aget(run_id=run["id"])
        await sync_to_async(self.deliver)()
        await sync_to_async(self.progress)(command, b"make", 0)
        frames = run_events(run["id"])
        head = await self.next_output(frames)
        await sync_to_async(self.progress)(command, b": it all went wrong; e", 4)
        await sync_to_async(self.progress)(command, b"rror\n", 26)
        await sync_to_async(self.finish)(command)
        rest = [data async for name, data in self.frames(frames) if name == "output"]

        self.assertEqual(head["data"], "make")
        self.assertEqual((rest[0]["offset"], rest[0]["dropped"]), (4, 23))
        self.assertEqual(
            "".join(e["data"] for e in [head, *rest]), "make" + dropped_marker(23) + "ror\n"
        )

    # Helpers ----------------------------------------------------------------------------

    async def reload(self, command: Command) -> Command:
        return await Command.objects.aget(pk=command.pk)

    async def frames(self, events):  # type: ignore[no-untyped-def]
        """(name, data) of each event until the stream ends (a deadline, not a sleep)."""
        async with asyncio.timeout(10):
            async for frame in events:
                if frame.startswith("event:"):
                    name, data = frame.split("\n")[:2]
                    yield name.removeprefix("event: "), json.loads(data.removeprefix("data: "))

    async def next_output(self, events) -> dict:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(10):
            async for frame in events:
                if frame.startswith("event: output"):
                    return json.loads(frame.split("\n")[1].removeprefix("data: "))
        raise AssertionError("the stream ended without output")
