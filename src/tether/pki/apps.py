from django.apps import AppConfig


class PkiConfig(AppConfig):
    name = "tether.pki"
    label = "pki"

    def ready(self) -> None:
        from tether.commands import hooks as command_hooks
        from tether.fleet import hooks as fleet_hooks

        from . import services

        # A registration is a new identity, a first RPC port needs a certificate, a delivery's
        # result tells whether the agent serves it; a registering agent learns the CA to pin.
        fleet_hooks.agent_registered.connect(services.agent_registered)
        fleet_hooks.agent_changed.connect(services.agent_changed)
        fleet_hooks.registration_extras.connect(services.registration_extras)
        command_hooks.command_finished.connect(services.certificate_installed)
