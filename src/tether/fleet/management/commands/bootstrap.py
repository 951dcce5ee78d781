"""`tether bootstrap`: what `make run` needs before serving: an admin user and a first
server whose agent command line is printed ready to paste."""

import os
import secrets
import shlex
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from ... import services
from ...models import Server

FIRST_SERVER = "first-server"


class Command(BaseCommand):
    help = "Ensure an admin user and a first server; print the URL and an agent command line."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--bind", default="127.0.0.1:8000")

    @transaction.atomic
    def handle(self, *args: Any, bind: str, **options: Any) -> None:
        User = get_user_model()
        username = os.environ.get("TETHER_ADMIN_USER", "admin")
        password = os.environ.get("TETHER_ADMIN_PASSWORD")
        admin = User.objects.filter(username=username).first()
        if admin is None:
            password = password or secrets.token_urlsafe(12)
            admin = User.objects.create_superuser(username, f"{username}@localhost", password)
            password_note = password
        elif password:
            admin.set_password(password)
            admin.save(update_fields=["password"])
            password_note = password
        else:
            password_note = "(printed when it was created; or set TETHER_ADMIN_PASSWORD)"

        # The server token is stored hashed, so the first server gets a fresh one on every
        # run; agents that already registered keep working with their own credentials.
        server = Server.objects.filter(owner=admin, name=FIRST_SERVER).first()
        if server is None:
            server, token = services.create_server(owner=admin, name=FIRST_SERVER, host="127.0.0.1")
        else:
            token = services.rotate_server_token(server=server, user=admin)

        url = os.environ.get("TETHER_PUBLIC_URL", "").rstrip("/") or f"http://{bind}"
        agent = Path(settings.AGENT_DIR) / "main.py"
        state_dir = settings.DATA_DIR / "agent-first-server"
        line = shlex.join(
            [
                "python3",
                str(agent),
                "--server",
                url,
                "--server-token",
                token,
                "--state-dir",
                str(state_dir),
            ]
        )
        self.stdout.write(
            f"\nTether is starting at {url}/\n"
            f"  admin user:     {username}\n"
            f"  admin password: {password_note}\n"
            f"  API token:      POST {url}/api/auth/token/ {{username, password}}\n\n"
            f"Start an agent for '{FIRST_SERVER}' (paste into another shell):\n\n"
            f"  {line}\n\n"
        )
