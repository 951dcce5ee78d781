"""Human API for rolling upgrades: `POST /api/rollouts/`, list, read, cancel."""

from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from tether.commands.api.runs import TargetsInput, target_agents
from tether.fleet.models import Agent
from tether.serializers import StrictInputMixin

from .. import rollouts
from ..models import Rollout
from ..selectors import rollouts_visible_to


class RolloutInput(StrictInputMixin, serializers.Serializer):
    targets = TargetsInput()
    batch_size = serializers.IntegerField(min_value=1, max_value=10_000)
    max_errors = serializers.IntegerField(min_value=0, max_value=10_000, default=0)


class RolloutSerializer(serializers.ModelSerializer):
    """A rollout as read: its counts, one row per upgrade started, and who is left."""

    created_by = serializers.CharField(source="created_by.username", read_only=True)
    counts = serializers.SerializerMethodField()
    deployments = serializers.SerializerMethodField()
    not_started = serializers.SerializerMethodField()

    class Meta:
        model = Rollout
        fields = [
            "id",
            "status",
            "reason",
            "target_version",
            "batch_size",
            "max_errors",
            "wave",
            "counts",
            "deployments",
            "not_started",
            "created_by",
            "created_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_counts(self, rollout: Rollout) -> dict[str, Any]:
        return rollouts.rollout_counts(rollout)

    def get_deployments(self, rollout: Rollout) -> list[dict[str, Any]]:
        rows = rollout.deployments.select_related("agent").order_by("id")
        return [
            {
                "deployment": d.pk,
                "agent": d.agent_id,
                "hostname": d.agent.hostname if d.agent else None,
                "method": d.method,
                "status": d.status,
            }
            for d in rows
        ]

    def get_not_started(self, rollout: Rollout) -> list[dict[str, Any]]:
        waiting = [*rollout.pending, *rollout.not_started]
        names = dict(Agent.objects.filter(pk__in=waiting).values_list("pk", "hostname"))
        return [{"agent": pk, "hostname": names.get(pk)} for pk in waiting]


class RolloutViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    lookup_value_regex = r"\d+"
    serializer_class = RolloutSerializer

    def get_queryset(self) -> QuerySet[Rollout]:
        return rollouts_visible_to(self.request.user)

    @extend_schema(request=RolloutInput, responses={201: RolloutSerializer})
    def create(self, request: Request) -> Response:
        """Upgrade many agents in waves of `batch_size`; past `max_errors` failed upgrades
        (default 0: the first failure) no further wave starts."""
        data = RolloutInput(data=request.data)
        data.is_valid(raise_exception=True)
        targets = data.validated_data["targets"]
        agents = target_agents(request.user, targets)
        rollout = rollouts.start_rollout(
            user=request.user,
            agents=agents,
            batch_size=data.validated_data["batch_size"],
            max_errors=data.validated_data["max_errors"],
            server_url=settings.PUBLIC_URL,
        )
        return Response(RolloutSerializer(rollout).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={202: RolloutSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        """Stop: no further wave starts; the wave's upgrades still going are cancelled."""
        rollout = rollouts.cancel_rollout(rollout=self.get_object(), user=request.user)
        return Response(RolloutSerializer(rollout).data, status=status.HTTP_202_ACCEPTED)
