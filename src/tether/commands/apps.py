from django.apps import AppConfig


class CommandsConfig(AppConfig):
    name = "tether.commands"
    label = "commands"
