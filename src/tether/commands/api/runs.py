"""Human API for runs (docs/runs.md): create, list, read, cancel, and the live stream."""

import re
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from tether.fleet.models import Agent
from tether.fleet.selectors import resolve_targets
from tether.serializers import StrictBoolean, StrictInputMixin

from .. import runs, services
from ..models import Command, Run
from ..selectors import runs_visible_to, target_counts, templates_visible_to
from .serializers import CommandInput

PERCENT = re.compile(r"([0-9]{1,3})%")
MAX_TARGET_NAMES = 10_000


class Limit(serializers.Field):
    """A count, or a percentage of the targets written "20%"."""

    def __init__(self, *, minimum: int, **kwargs: Any) -> None:
        self.minimum = minimum
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> int | str:
        if isinstance(data, bool):
            raise serializers.ValidationError('Give a number or a percentage such as "20%".')
        if isinstance(data, int):
            if not self.minimum <= data <= 1_000_000:
                raise serializers.ValidationError(
                    f"A number from {self.minimum} to 1000000, or a percentage."
                )
            return data
        match = PERCENT.fullmatch(data) if isinstance(data, str) else None
        if match is None:
            raise serializers.ValidationError('Give a number or a percentage such as "20%".')
        percent = int(match.group(1))
        if not max(self.minimum, 0) <= percent <= 100 or (self.minimum and percent == 0):
            raise serializers.ValidationError(f"A percentage from {self.minimum} to 100.")
        return f"{percent}%"

    def to_representation(self, value: Any) -> Any:
        return value


class TargetsInput(StrictInputMixin, serializers.Serializer):
    agents = serializers.ListField(
        child=serializers.JSONField(), required=False, max_length=MAX_TARGET_NAMES
    )
    tags = serializers.ListField(
        child=serializers.CharField(max_length=64), required=False, max_length=100
    )
    servers = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=2**62),
        required=False,
        max_length=MAX_TARGET_NAMES,
    )
    all = StrictBoolean(required=False)

    def validate_agents(self, value: list[Any]) -> list[int | str]:
        for item in value:
            ok_id = isinstance(item, int) and not isinstance(item, bool) and 0 < item < 2**62
            ok_name = isinstance(item, str) and 0 < len(item) <= 255
            if not (ok_id or ok_name):
                raise serializers.ValidationError("Give agent ids or hostnames.")
        return value

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        if not (data.get("agents") or data.get("tags") or data.get("servers") or data.get("all")):
            raise serializers.ValidationError("Name at least one agent, tag or server, or all.")
        return data


class RunInput(CommandInput):
    """`POST /api/runs/`: what to run (as send_command takes it), where, and how."""

    targets = TargetsInput()
    max_concurrency = Limit(minimum=1, required=False)
    max_errors = Limit(minimum=0, required=False, allow_null=True)
    offline = serializers.ChoiceField(choices=Run.Offline.choices, default=Run.Offline.SKIP)


def target_agents(user: AbstractBaseUser, targets: dict[str, Any]) -> list[Agent]:
    """The agents a validated `TargetsInput` names, as `user` may see them (runs, rollouts
    and the fleet-wide status check alike)."""
    return resolve_targets(
        user,
        agents=targets.get("agents", []),
        tags=targets.get("tags", []),
        servers=targets.get("servers", []),
        everything=targets.get("all", False),
    )


class RunTargetSerializer(serializers.ModelSerializer):
    """One target of a run: its agent and the command it got."""

    command = serializers.IntegerField(source="pk")
    hostname = serializers.CharField(source="agent.hostname")
    duration = serializers.SerializerMethodField()

    class Meta:
        model = Command
        fields = [
            "agent",
            "hostname",
            "command",
            "status",
            "exit_code",
            "error",
            "started_at",
            "finished_at",
            "duration",
        ]
        read_only_fields = fields

    def get_duration(self, command: Command) -> float | None:
        if command.started_at is None or command.finished_at is None:
            return None
        return round((command.finished_at - command.started_at).total_seconds(), 3)


class RunSummarySerializer(serializers.ModelSerializer):
    """A run without its targets, for lists."""

    created_by = serializers.CharField(source="created_by.username", read_only=True)
    counts = serializers.SerializerMethodField()

    class Meta:
        model = Run
        fields = [
            "id",
            "status",
            "reason",
            "command",
            "args",
            "template",
            "timeout",
            "max_concurrency",
            "max_errors",
            "offline",
            "expires_in",
            "counts",
            "created_by",
            "created_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_counts(self, run: Run) -> dict[str, int]:
        # A list passes the counts of its whole page, counted in one query.
        counted = self.context.get("counts", {})
        return counted[run.pk] if run.pk in counted else runs.run_counts(run)


class RunSerializer(RunSummarySerializer):
    """A run as read (docs/runs.md): with one row per target."""

    targets = serializers.SerializerMethodField()

    class Meta(RunSummarySerializer.Meta):
        fields = [*RunSummarySerializer.Meta.fields, "targets"]
        read_only_fields = fields

    def get_targets(self, run: Run) -> list[dict[str, Any]]:
        rows = run.commands.select_related("agent").order_by("agent__hostname", "id")
        return RunTargetSerializer(rows, many=True).data


def run_request(user: AbstractBaseUser, values: dict[str, Any]) -> runs.RunRequest:
    """What `RunInput`'s validated values ask for, with the targets and the template resolved
    as `user` may see them: another user's agent, server or template is a 404; a template's
    values that do not fit, a 400."""
    template = None
    command, args, timeout = values.get("command"), values.get("args"), values.get("timeout")
    if "template" in values:
        template = templates_visible_to(user).filter(pk=values["template"]).first()
        if template is None:
            raise exceptions.NotFound("No such template.")
        command, args = services.render_template(template, values.get("params")), None
        timeout = timeout or template.timeout
    return runs.RunRequest(
        agents=target_agents(user, values["targets"]),
        command=command,
        args=args,
        timeout=timeout or settings.COMMAND_TIMEOUT_DEFAULT,
        max_concurrency=values.get("max_concurrency"),
        max_errors=values.get("max_errors"),
        offline=values["offline"],
        template=template,
        expires_in=values.get("expires_in"),
    )


def start_run(
    user: AbstractBaseUser, values: dict[str, Any], *, key: str = "", body: Any = None
) -> tuple[Run, bool]:
    """Start the run `RunInput`'s validated values ask for (the API and the "Run on many"
    page alike); False: a retry with its `key`, answered with the run it made (looked up
    before the targets are resolved, so a retry answers even when the fleet has changed)."""
    request_hash = runs.fingerprint(body) if key else ""
    earlier = runs.replayed_run(user, key, request_hash) if key else None
    if earlier is not None:
        return earlier, False
    return runs.create_run(
        user=user,
        request=run_request(user, values),
        idempotency_key=key,
        request_hash=request_hash,
    )


class RunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    lookup_value_regex = r"\d+"

    def get_queryset(self) -> QuerySet[Run]:
        return runs_visible_to(self.request.user)

    def get_serializer_class(self) -> type:
        return RunSummarySerializer if self.action == "list" else RunSerializer

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """A page of runs with their counts: one query for the counts of the whole page."""
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        context = {**self.get_serializer_context(), "counts": target_counts(r.pk for r in page)}
        return self.get_paginated_response(
            RunSummarySerializer(page, many=True, context=context).data
        )

    @extend_schema(
        request=RunInput,
        responses={201: RunSerializer, 200: RunSerializer},
        parameters=[OpenApiParameter("Idempotency-Key", str, OpenApiParameter.HEADER)],
    )
    def create(self, request: Request) -> Response:
        """Send one command to many agents; 201 with the run (200: a replayed key's run)."""
        data = RunInput(data=request.data)
        data.is_valid(raise_exception=True)
        key = request.headers.get("Idempotency-Key", "").strip()
        if len(key) > 200:
            raise exceptions.ValidationError({"Idempotency-Key": ["At most 200 characters."]})
        run, created = start_run(request.user, data.validated_data, key=key, body=request.data)
        answer = RunSerializer(run).data
        return Response(answer, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(request=None, responses={202: RunSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        """Cancel: targets not started end at once, running ones are killed by their agents."""
        run = runs.cancel_run(run=self.get_object(), user=request.user)
        return Response(RunSerializer(run).data, status=status.HTTP_202_ACCEPTED)
