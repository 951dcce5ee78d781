from django.apps import AppConfig


class FleetConfig(AppConfig):
    name = "tether.fleet"
    label = "fleet"
