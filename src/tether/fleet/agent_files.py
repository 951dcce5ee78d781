"""The agent's own files as this server hands them out (TETHER_AGENT_DIR): which ones, and
the version they carry. Installs and upgrades install exactly these."""

import re

from django.conf import settings

AGENT_FILES = ("main.py", "requirements.txt")
VERSION_LINE = re.compile(rb"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def agent_version() -> str:
    """The version of the agent file this server hands out (its `__version__` line)."""
    try:
        found = VERSION_LINE.search((settings.AGENT_DIR / "main.py").read_bytes())
    except OSError:
        return ""
    return found.group(1).decode() if found else ""
