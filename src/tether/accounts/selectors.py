"""Ownership in one place: what a user may see. Staff see everything."""

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from tether.commands.models import Command, CommandTemplate
from tether.deploy.models import Deployment
from tether.fleet.models import Agent, Server


def servers_visible_to(user: AbstractBaseUser) -> QuerySet[Server]:
    qs = Server.objects.all()
    return qs if user.is_staff else qs.filter(owner=user)


def agents_visible_to(user: AbstractBaseUser) -> QuerySet[Agent]:
    qs = Agent.objects.select_related("server")
    return qs if user.is_staff else qs.filter(server__owner=user)


def commands_visible_to(user: AbstractBaseUser) -> QuerySet[Command]:
    qs = Command.objects.select_related("agent", "created_by")
    return qs if user.is_staff else qs.filter(agent__server__owner=user)


def templates_visible_to(user: AbstractBaseUser) -> QuerySet[CommandTemplate]:
    return CommandTemplate.objects.filter(owner=user)


def deployments_visible_to(user: AbstractBaseUser) -> QuerySet[Deployment]:
    qs = Deployment.objects.select_related("created_by")
    return qs if user.is_staff else qs.filter(server__owner=user)
