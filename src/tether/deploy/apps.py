from django.apps import AppConfig


class DeployConfig(AppConfig):
    name = "tether.deploy"
    label = "deploy"
