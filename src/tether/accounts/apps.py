from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "tether.accounts"
    label = "accounts"

    def ready(self) -> None:
        from . import schema  # noqa: F401  (the OpenAPI description of API tokens)
