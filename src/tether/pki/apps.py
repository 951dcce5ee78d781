from django.apps import AppConfig


class PkiConfig(AppConfig):
    name = "tether.pki"
    label = "pki"
