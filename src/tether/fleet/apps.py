from django.apps import AppConfig


class FleetConfig(AppConfig):
    name = "tether.fleet"
    label = "fleet"

    def ready(self) -> None:
        from . import schema  # noqa: F401  (registers the OpenAPI auth extension)
