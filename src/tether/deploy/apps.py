from django.apps import AppConfig


class DeployConfig(AppConfig):
    name = "tether.deploy"
    label = "deploy"

    def ready(self) -> None:
        from tether.commands import hooks as command_hooks
        from tether.fleet import hooks as fleet_hooks

        from . import hooks, rollouts, services

        # An internal command's result moves its deployment on (a stop acknowledged, an
        # upgrade swapped in, a failure); a new version reported ends an upgrade; an SSH
        # install's one-time token registers its agent.
        command_hooks.command_finished.connect(services.internal_command_finished)
        fleet_hooks.agent_changed.connect(services.agent_changed)
        fleet_hooks.enrollment_for_token.connect(services.enrollment_for_token)
        # A rolling upgrade's next wave starts when the deployments of its wave have ended.
        hooks.deployment_finished.connect(rollouts.advance_rollout)
