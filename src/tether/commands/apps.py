from django.apps import AppConfig


class CommandsConfig(AppConfig):
    name = "tether.commands"
    label = "commands"

    def ready(self) -> None:
        from tether.fleet import hooks as fleet_hooks

        from . import services

        # What an agent was running under its old identity will not be reported under it.
        fleet_hooks.agent_registered.connect(services.mark_commands_lost_on_reregister)
