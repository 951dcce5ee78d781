from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save

from tether import wakeups


class FleetConfig(AppConfig):
    name = "tether.fleet"
    label = "fleet"

    def ready(self) -> None:
        from . import authentication, schema  # noqa: F401  (schema: the OpenAPI auth extension)
        from .models import Agent

        post_save.connect(authentication.agent_saved, sender=Agent, dispatch_uid="fleet-cache")
        post_delete.connect(authentication.agent_deleted, sender=Agent, dispatch_uid="fleet-cache")
        wakeups.observe(authentication.forget_on_notify)
        wakeups.on_resync(authentication.clear_cache)
