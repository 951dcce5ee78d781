"""Runs: one command to many agents (docs/runs.md)."""

import asyncio
from typing import Any

from asgiref.sync import sync_to_async
from django.test import override_settings

from tether.accounts.models import AuditEvent
from tether.commands import runs
from tether.commands import services as command_services
from tether.commands.api.run_stream import run_events
from tether.commands.command_templates import validate_parameters
from tether.commands.models import Command, CommandTemplate, OutputChunk, Run
from tether.commands.output import Chunk
from tether.commands.reports import Result
from tether.fleet import services as fleet_services
from tether.fleet.models import Agent

from ..base import BaseTestCase

S = Command.Status


class RunTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.agents = [self.agent]
        for n in range(2, 6):
            registration = fleet_services.register_agent(server=self.server, hostname=f"web-{n}")
            self.agents.append(registration.agent)
        for agent in self.agents:
            fleet_services.record_heartbeat(agent=agent)
        Agent.objects.filter(pk__in=[a.pk for a in self.agents[:3]]).update(tags=["web"])

    def start(self, expect: int = 201, headers: dict | None = None, **body: Any) -> dict:
        body.setdefault("command", "uptime")
        body.setdefault("targets", {"all": True})
        body = {name: value for name, value in body.items() if value is not None}
        response = self.client.post("/api/runs/", body, format="json", headers=headers or {})
        self.assertEqual(response.status_code, expect, response.content)
        return response.json()

    def targets(self, run: dict) -> list[Command]:
        return list(Command.objects.filter(run_id=run["id"]).order_by("agent__hostname"))

    def finish(self, command: Command, status: str = S.SUCCEEDED, exit_code: int = 0) -> None:
        with self.captureOnCommitCallbacks(execute=True):
            command_services.record_result(
                agent=command.agent,
                command_id=command.pk,
                result=Result(status=status, exit_code=exit_code),
            )

    def nothing_queued(self) -> None:
        self.assertFalse(Run.objects.exists())
        self.assertFalse(Command.objects.exists())


class CreateRunTestCase(RunTestCase):
    def test_it_sends_the_command_to_every_target(self) -> None:
        run = self.start(targets={"all": True})

        self.assertEqual(run["status"], "running")
        self.assertEqual(run["counts"]["total"], 5)
        self.assertEqual(run["counts"]["queued"], 5)
        self.assertEqual([t["hostname"] for t in run["targets"]], [a.hostname for a in self.agents])
        for command in self.targets(run):
            self.assertEqual((command.command, command.status), ("uptime", S.QUEUED))
        self.assertTrue(AuditEvent.objects.filter(action="run.create", target_id=run["id"]))

    def test_targets_are_the_union_of_ids_hostnames_tags_and_servers(self) -> None:
        run = self.start(targets={"agents": [self.agents[4].pk, "web-4"], "tags": ["web"]})
        self.assertEqual(
            [t["hostname"] for t in run["targets"]], ["web-1", "web-2", "web-3", "web-4", "web-5"]
        )

        run = self.start(targets={"servers": [self.server.pk]})
        self.assertEqual(run["counts"]["total"], 5)

    def test_each_agent_gets_its_command_once_however_often_it_is_named(self) -> None:
        run = self.start(targets={"agents": [self.agent.pk, "web-1"], "tags": ["web"]})

        self.assertEqual(run["counts"]["total"], 3)

    def test_only_the_window_is_released_and_each_end_lets_the_next_in(self) -> None:
        run = self.start(max_concurrency=2)
        self.assertEqual(
            [c.status for c in self.targets(run)], [S.QUEUED, S.QUEUED, S.HELD, S.HELD, S.HELD]
        )
        self.assertEqual(self.deliver(self.agents[2]), [])  # a held target is not handed out

        self.finish(self.targets(run)[0])

        statuses = [c.status for c in self.targets(run)]
        self.assertEqual(statuses, [S.SUCCEEDED, S.QUEUED, S.QUEUED, S.HELD, S.HELD])

    def test_a_percentage_window_rounds_up(self) -> None:
        run = self.start(max_concurrency="30%")  # 1.5 of 5 targets: 2

        self.assertEqual(run["max_concurrency"], 2)
        self.assertEqual(run["counts"]["queued"], 5)
        self.assertEqual(sum(c.status == S.QUEUED for c in self.targets(run)), 2)

    def test_it_ends_succeeded_when_every_target_succeeded(self) -> None:
        run = self.start(max_concurrency=5)
        for command in self.targets(run):
            self.finish(command)

        detail = self.client.get(f"/api/runs/{run['id']}/").json()
        self.assertEqual(detail["status"], "succeeded")
        self.assertEqual(detail["counts"]["succeeded"], 5)
        self.assertIsNotNone(detail["finished_at"])

    def test_it_ends_failed_when_a_target_did_not_succeed(self) -> None:
        run = self.start()
        commands = self.targets(run)
        self.finish(commands[0], S.FAILED, 1)
        for command in commands[1:]:
            self.finish(command)

        detail = self.client.get(f"/api/runs/{run['id']}/").json()
        self.assertEqual(detail["status"], "failed")
        self.assertEqual((detail["counts"]["failed"], detail["counts"]["succeeded"]), (1, 4))
        self.assertEqual(detail["targets"][0]["exit_code"], 1)

    def test_a_template_run_renders_its_values_once_for_all(self) -> None:
        template = CommandTemplate.objects.create(
            owner=self.alice,
            name="restart",
            command="systemctl restart {unit}",
            parameters=validate_parameters(
                "systemctl restart {unit}", [{"name": "unit", "type": "string"}]
            ),
        )
        run = self.start(command=None, template=template.pk, params={"unit": "a b"})

        self.assertEqual(run["command"], "systemctl restart 'a b'")
        self.assertEqual(self.targets(run)[0].command, "systemctl restart 'a b'")

    def test_a_template_run_is_a_shell_line_even_with_an_empty_args_list(self) -> None:
        template = CommandTemplate.objects.create(owner=self.alice, name="up", command="uptime")

        run = self.start(command=None, template=template.pk, args=[])

        self.assertIsNone(self.targets(run)[0].args)


class OfflineTargetsTestCase(RunTestCase):
    def setUp(self) -> None:
        super().setUp()
        Agent.objects.filter(pk=self.agents[1].pk).update(status=Agent.Status.OFFLINE)

    def test_offline_targets_are_skipped_at_once_by_default(self) -> None:
        run = self.start()

        self.assertEqual(run["counts"]["skipped"], 1)
        skipped = self.targets(run)[1]
        self.assertEqual(skipped.status, S.SKIPPED)
        self.assertIn("offline", skipped.error)
        for command in self.targets(run):
            if command.status != S.SKIPPED:
                self.finish(command)
        detail = self.client.get(f"/api/runs/{run['id']}/").json()
        self.assertEqual(detail["status"], "failed")  # not every target ran

    def test_with_wait_an_offline_target_waits_for_its_agent(self) -> None:
        run = self.start(offline="wait")

        self.assertEqual(run["counts"]["skipped"], 0)
        self.assertEqual(self.targets(run)[1].status, S.QUEUED)


class AgentsGoneMidRunTestCase(RunTestCase):
    def go_offline(self, agent: Agent) -> None:
        Agent.objects.filter(pk=agent.pk).update(status=Agent.Status.OFFLINE, last_heartbeat=None)

    def test_a_held_target_whose_agent_went_offline_is_skipped_at_its_turn(self) -> None:
        run = self.start(max_concurrency=1)
        first, second, third = self.targets(run)[:3]
        self.go_offline(second.agent)

        self.finish(first)

        second.refresh_from_db()
        third.refresh_from_db()
        self.assertEqual((second.status, third.status), (S.SKIPPED, S.QUEUED))

    def test_with_wait_online_agents_go_first(self) -> None:
        run = self.start(max_concurrency=1, offline="wait")
        first, second, third = self.targets(run)[:3]
        self.go_offline(second.agent)

        self.finish(first)

        second.refresh_from_db()
        third.refresh_from_db()
        self.assertEqual((second.status, third.status), (S.HELD, S.QUEUED))

    def test_the_sweep_skips_a_released_target_whose_agent_is_gone(self) -> None:
        run = self.start(max_concurrency=1, targets={"agents": ["web-1", "web-2"]})
        first, second = self.targets(run)
        self.finish(first)
        self.go_offline(second.agent)

        with self.captureOnCommitCallbacks(execute=True):
            self.assertEqual(runs.skip_unreachable_targets(), 1)

        second.refresh_from_db()
        self.assertEqual(second.status, S.SKIPPED)
        self.assertEqual(Run.objects.get(pk=run["id"]).status, Run.Status.FAILED)

    def test_a_run_whose_targets_were_deleted_does_not_read_as_succeeded(self) -> None:
        run = self.start(targets={"agents": ["web-1", "web-2"]})
        first, second = self.targets(run)
        self.finish(first)

        second.agent.delete()
        runs.advance_run(run["id"])

        detail = self.client.get(f"/api/runs/{run['id']}/").json()
        self.assertEqual(detail["status"], "failed")
        self.assertIn("1 target(s) were deleted", detail["reason"])


class MaxErrorsTestCase(RunTestCase):
    def test_past_max_errors_the_targets_not_started_are_cancelled(self) -> None:
        run = self.start(max_concurrency=1, max_errors=1)
        self.finish(self.targets(run)[0], S.FAILED, 1)
        self.assertEqual(self.client.get(f"/api/runs/{run['id']}/").json()["status"], "running")

        self.finish(self.targets(run)[1], S.FAILED, 1)

        detail = self.client.get(f"/api/runs/{run['id']}/").json()
        self.assertEqual(detail["status"], "failed")
        self.assertEqual(detail["counts"]["cancelled"], 3)
        self.assertIn("max_errors (1) exceeded: 2 targets failed; 3 not started", detail["reason"])
        for command in self.targets(run)[2:]:
            self.assertEqual(command.status, S.CANCELLED)

    def test_a_running_target_is_left_to_finish(self) -> None:
        run = self.start(max_concurrency=2, max_errors=0)
        first, second = self.targets(run)[:2]
        self.deliver(second.agent)

        self.finish(first, S.FAILED, 1)

        second.refresh_from_db()
        self.assertEqual(second.status, S.DELIVERED)
        self.assertEqual(sum(c.status == S.CANCELLED for c in self.targets(run)), 3)
        self.finish(second)
        self.assertEqual(Run.objects.get(pk=run["id"]).status, Run.Status.FAILED)

    def test_a_target_handed_out_but_not_started_is_asked_to_cancel(self) -> None:
        run = self.start(max_concurrency=2, max_errors=0)
        first, second = self.targets(run)[:2]
        self.deliver(second.agent)

        self.finish(first, S.FAILED, 1)

        second.refresh_from_db()
        self.assertEqual((second.status, second.cancel_requested), (S.DELIVERED, True))

    def test_a_lost_target_counts_as_an_error(self) -> None:
        run = self.start(max_concurrency=1, max_errors=0)
        first = self.targets(run)[0]
        self.deliver(first.agent)
        Command.objects.filter(pk=first.pk).update(status=S.RUNNING)
        fleet_services.register_agent(server=self.server, hostname=first.agent.hostname)

        self.assertEqual(Run.objects.get(pk=run["id"]).status, Run.Status.FAILED)
        self.assertEqual(sum(c.status == S.CANCELLED for c in self.targets(run)), 4)


class IdempotencyTestCase(RunTestCase):
    def test_a_retried_request_returns_the_same_run(self) -> None:
        first = self.start(headers={"Idempotency-Key": "k-1"})
        again = self.start(expect=200, headers={"Idempotency-Key": "k-1"})

        self.assertEqual(again["id"], first["id"])
        self.assertEqual(Run.objects.count(), 1)
        self.assertEqual(Command.objects.count(), 5)

    def test_the_key_is_the_users_own(self) -> None:
        self.start(headers={"Idempotency-Key": "k-1"})
        bob = self.client_for(self.bob)
        response = bob.post(
            "/api/runs/",
            {"command": "id", "targets": {"all": True}},
            format="json",
            headers={"Idempotency-Key": "k-1"},
        )

        self.assertEqual(response.status_code, 201, response.content)
        self.assertEqual(Run.objects.count(), 2)

    def test_a_retry_answers_the_run_even_when_the_fleet_changed_since(self) -> None:
        first = self.start(targets={"tags": ["web"]}, headers={"Idempotency-Key": "k-2"})
        Agent.objects.update(tags=[])

        again = self.start(
            expect=200, targets={"tags": ["web"]}, headers={"Idempotency-Key": "k-2"}
        )

        self.assertEqual(again["id"], first["id"])

    def test_a_key_reused_for_another_request_is_refused(self) -> None:
        self.start(headers={"Idempotency-Key": "k-1"})

        response = self.client.post(
            "/api/runs/",
            {"command": "reboot", "targets": {"all": True}},
            format="json",
            headers={"Idempotency-Key": "k-1"},
        )

        self.assertError(response, 409, "idempotency_key_reused")
        self.assertEqual(Run.objects.count(), 1)


class BadInputTestCase(RunTestCase):
    def refused(self, status: int, body: dict, field: str | None = None) -> dict:
        response = self.client.post("/api/runs/", body, format="json")
        error = self.assertError(response, status)
        if field:
            self.assertIn(field, error.get("fields", {}), error)
        self.nothing_queued()
        return error

    def test_it_refuses_bad_input_and_queues_nothing(self) -> None:
        good = {"command": "id", "targets": {"all": True}}
        cases = [
            ({**good, "targets": {"tags": ["nope"]}}, "targets"),
            ({**good, "targets": {}}, "targets"),
            ({**good, "targets": {"agents": []}}, "targets"),
            ({**good, "targets": {"agents": [True]}}, "targets"),
            ({**good, "targets": {"all": "yes"}}, "targets"),
            ({**good, "max_concurrency": 0}, "max_concurrency"),
            ({**good, "max_concurrency": "0%"}, "max_concurrency"),
            ({**good, "max_concurrency": "150%"}, "max_concurrency"),
            ({**good, "max_concurrency": "five"}, "max_concurrency"),
            ({**good, "max_errors": -1}, "max_errors"),
            ({**good, "max_errors": 10**30}, "max_errors"),
            ({**good, "offline": "maybe"}, "offline"),
            ({**good, "timeout": 0}, "timeout"),
            ({**good, "surprise": 1}, "surprise"),
            ({"targets": {"all": True}}, None),
            ({**good, "command": "  "}, "command"),
        ]
        for body, field in cases:
            with self.subTest(body=body):
                self.refused(400, body, field)

    def test_a_template_with_a_missing_parameter_is_refused(self) -> None:
        template = CommandTemplate.objects.create(
            owner=self.alice,
            name="restart",
            command="systemctl restart {unit}",
            parameters=validate_parameters(
                "systemctl restart {unit}", [{"name": "unit", "type": "string"}]
            ),
        )
        error = self.refused(400, {"template": template.pk, "targets": {"all": True}}, "params")
        self.assertIn("unit", str(error["fields"]["params"]))

    def test_another_users_agent_server_or_template_is_not_found(self) -> None:
        bob_template = CommandTemplate.objects.create(owner=self.bob, name="t", command="id")
        for targets in (
            {"agents": [self.agent.pk, self.bob_agent.pk]},
            {"agents": ["web-1", "db-1"]},
            {"servers": [self.bob_server.pk]},
        ):
            with self.subTest(targets=targets):
                self.refused(404, {"command": "id", "targets": targets})
        self.refused(404, {"template": bob_template.pk, "targets": {"all": True}})

    def test_all_means_the_users_own_agents(self) -> None:
        run = self.start(targets={"all": True})

        self.assertNotIn(self.bob_agent.pk, [t["agent"] for t in run["targets"]])


class CancelRunTestCase(RunTestCase):
    def test_it_cancels_what_has_not_started_and_asks_the_agents_for_the_rest(self) -> None:
        run = self.start(max_concurrency=2)
        first, second = self.targets(run)[:2]
        self.deliver(first.agent)

        response = self.client.post(f"/api/runs/{run['id']}/cancel/")

        self.assertEqual(response.status_code, 202, response.content)
        first.refresh_from_db()
        self.assertTrue(first.cancel_requested)
        self.assertEqual(first.status, S.DELIVERED)
        self.assertEqual([c.status for c in self.targets(run)[1:]], [S.CANCELLED] * 4)
        self.assertEqual(response.json()["status"], "running")  # until the agent reports

        self.finish(first, S.CANCELLED, -15)

        detail = self.client.get(f"/api/runs/{run['id']}/").json()
        self.assertEqual(detail["status"], "cancelled")
        self.assertEqual(detail["reason"], "cancelled by alice")

    def test_a_finished_run_cannot_be_cancelled(self) -> None:
        run = self.start(targets={"agents": [self.agent.pk]})
        self.finish(self.targets(run)[0])

        self.assertError(self.client.post(f"/api/runs/{run['id']}/cancel/"), 409, "already_final")

    def test_a_target_cancelled_alone_lets_the_next_one_in(self) -> None:
        run = self.start(max_concurrency=1)
        command_services.cancel_command(command=self.targets(run)[0], user=self.alice)

        self.assertEqual(self.targets(run)[1].status, S.QUEUED)


class ReadRunTestCase(RunTestCase):
    def test_it_lists_own_runs_newest_first(self) -> None:
        older = self.start()
        newer = self.start()
        self.client_for(self.bob).post(
            "/api/runs/", {"command": "id", "targets": {"all": True}}, format="json"
        )

        listing = self.client.get("/api/runs/").json()

        self.assertEqual([r["id"] for r in listing["results"]], [newer["id"], older["id"]])
        self.assertNotIn("targets", listing["results"][0])

    def test_another_users_run_is_not_found(self) -> None:
        run = self.start()
        bob = self.client_for(self.bob)

        self.assertError(bob.get(f"/api/runs/{run['id']}/"), 404)
        self.assertError(bob.post(f"/api/runs/{run['id']}/cancel/"), 404)
        self.assertEqual(bob.get(f"/api/runs/{run['id']}/stream/").status_code, 404)
        self.assertEqual(Run.objects.get(pk=run["id"]).status, Run.Status.RUNNING)

    def test_a_target_command_names_its_run(self) -> None:
        run = self.start()

        command = self.read(self.targets(run)[0].pk)
        self.assertEqual(command["run"], run["id"])

    def test_the_agent_cannot_report_a_held_target(self) -> None:
        run = self.start(max_concurrency=1)
        held = self.targets(run)[1]

        response = self.result(held.pk, status="succeeded", exit_code=0)
        self.assertNotEqual(response.status_code, 200)
        response = self.agent_post(
            f"/api/agents/command/{held.pk}/progress/", {"stdout": "x", "offset_stdout": 0}
        )
        held.refresh_from_db()
        self.assertEqual((held.status, held.stdout_end), (S.HELD, 0))

    def test_output_of_a_target_reads_like_any_command(self) -> None:
        run = self.start(targets={"agents": [self.agent.pk]})
        target = self.targets(run)[0]
        self.deliver()
        with self.captureOnCommitCallbacks(execute=True):
            command_services.record_result(
                agent=self.agent,
                command_id=target.pk,
                result=Result(status="succeeded", exit_code=0, chunks=[Chunk("stdout", b"up", 0)]),
            )

        self.assertEqual(self.read(target.pk)["stdout"], "up")


class RunStreamTestCase(RunTestCase):
    """The run's SSE stream read as its generator: what a watcher receives, in order."""

    async def follow(self, run_id: int) -> asyncio.Queue:
        """Read the stream in a task of its own (cancelling a pending `anext` would close
        the generator), frames into a queue."""
        frames: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            async for frame in run_events(run_id):
                await frames.put(frame)

        self.pump = asyncio.create_task(pump())
        return frames

    async def events_until_quiet(self, frames: asyncio.Queue) -> list[tuple[str, dict]]:
        import json

        seen = []
        while True:
            try:
                frame = await asyncio.wait_for(frames.get(), timeout=0.5)
            except TimeoutError:
                return seen
            if frame.startswith("event:"):
                name, data = frame.split("\n")[:2]
                seen.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))

    def outputs(self, events: list[tuple[str, dict]]) -> dict[int, str]:
        texts: dict[int, str] = {}
        for name, data in events:
            if name == "output":
                texts[data["command"]] = texts.get(data["command"], "") + data["data"]
        return texts

    @override_settings(POLL_RECHECK=0.05)
    async def test_output_committed_out_of_id_order_is_not_lost(self) -> None:
        run = await sync_to_async(self.start)(targets={"agents": ["web-1", "web-2"]})
        first, second = await sync_to_async(self.targets)(run)
        stream = await self.follow(run["id"])
        await self.events_until_quiet(stream)

        # web-2's chunk gets the higher id but is seen before web-1's (committed later).
        await sync_to_async(self.store)(second, b"two\n", chunk_id=1000)
        got = await self.events_until_quiet(stream)
        await sync_to_async(self.store)(first, b"one\n", chunk_id=999)
        got += await self.events_until_quiet(stream)

        self.assertEqual(self.outputs(got), {second.pk: "two\n", first.pk: "one\n"})
        hosts = {data["command"]: data["hostname"] for name, data in got if name == "output"}
        self.assertEqual(hosts, {first.pk: "web-1", second.pk: "web-2"})
        self.pump.cancel()

    @override_settings(POLL_RECHECK=0.05)
    async def test_output_stored_again_whole_is_sent_once(self) -> None:
        run = await sync_to_async(self.start)(targets={"agents": ["web-1"]})
        (target,) = await sync_to_async(self.targets)(run)
        stream = await self.follow(run["id"])
        await sync_to_async(self.store)(target, b"abc", chunk_id=500)
        got = await self.events_until_quiet(stream)

        # The older dialect's final result replaces the stored output with the whole of it.
        await sync_to_async(self.replace)(target, b"abcdef", chunk_id=501)
        got += await self.events_until_quiet(stream)

        self.assertEqual(self.outputs(got), {target.pk: "abcdef"})
        self.pump.cancel()

    @override_settings(POLL_RECHECK=0.05)
    async def test_a_character_cut_at_the_end_is_sent_as_its_replacement(self) -> None:
        run = await sync_to_async(self.start)(targets={"agents": ["web-1"]})
        (target,) = await sync_to_async(self.targets)(run)
        stream = await self.follow(run["id"])
        await sync_to_async(self.store)(target, b"w\xe2\x82", chunk_id=700)
        await sync_to_async(lambda: self.finish(Command.objects.get(pk=target.pk)))()

        got = await self.events_until_quiet(stream)

        self.assertEqual(self.outputs(got), {target.pk: "w\ufffd"})
        self.assertEqual(got[-1][0], "end")
        self.pump.cancel()

    def store(self, command: Command, data: bytes, chunk_id: int) -> None:
        offset = Command.objects.get(pk=command.pk).stdout_end
        OutputChunk.objects.create(
            id=chunk_id, command=command, stream="stdout", offset=offset, data=data
        )
        Command.objects.filter(pk=command.pk).update(stdout_end=offset + len(data))

    def replace(self, command: Command, data: bytes, chunk_id: int) -> None:
        OutputChunk.objects.filter(command=command).delete()
        OutputChunk.objects.create(
            id=chunk_id, command=command, stream="stdout", offset=0, data=data
        )
        Command.objects.filter(pk=command.pk).update(stdout_end=len(data))
