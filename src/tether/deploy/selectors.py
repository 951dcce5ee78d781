"""Questions about deployments, asked the same way by the API, the pages and the streams."""

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from tether.accounts.selectors import owned_by
from tether.fleet.models import Agent

from .models import Deployment, Rollout

HISTORY_LENGTH = 50


def deployments_visible_to(user: AbstractBaseUser) -> QuerySet[Deployment]:
    """The deployments on the servers `user` may see."""
    return owned_by(user, Deployment.objects.select_related("created_by"), "server__owner")


def rollouts_visible_to(user: AbstractBaseUser) -> QuerySet[Rollout]:
    """The rollouts `user` started (staff: everyone's)."""
    return owned_by(user, Rollout.objects.select_related("created_by"), "created_by")


def deployment_history(agent: Agent, length: int = HISTORY_LENGTH) -> QuerySet[Deployment]:
    """The agent's latest deployments, newest first."""
    return agent.deployments.select_related("created_by").order_by("-created_at", "-id")[:length]
