"""`make run` on a fresh data dir prints a URL, admin credentials and an agent command line
that, pasted into another shell, brings an agent online."""

import os
import queue
import re
import shlex
import signal
import subprocess
import threading
from pathlib import Path

from tests.conftest import ROOT, Api, free_port, fresh_database_url, kill_group, spawn, wait_for


def test_make_run_prints_what_a_new_user_needs(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "TETHER_DATA_DIR": str(tmp_path / "var"), "PYTHONUNBUFFERED": "1"}
    env.pop("TETHER_ADMIN_PASSWORD", None)
    if url := fresh_database_url():
        env["TETHER_DATABASE_URL"] = url
    make = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"BIND=127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in make.stdout], daemon=True).start()
    seen: list[str] = []

    def printed(pattern: str) -> re.Match[str] | None:
        while not lines.empty():
            seen.append(lines.get())
        return re.search(pattern, "".join(seen), re.M)

    try:
        agent_line = wait_for(
            lambda: printed(r"^\s+(python3 \S+main\.py .*)$"),
            timeout=120,
            what="the agent command line",
        )
        url = printed(r"Tether is starting at (\S+)/").group(1)
        password = printed(r"admin password: (\S+)").group(1)
        assert url == f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return Api(url).get("/healthz", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(healthy, timeout=60, what="the server")
        status, body = Api(url).post(
            "/api/auth/token/", {"username": "admin", "password": password}
        )
        assert status == 200, body
        admin = Api(url, {"Authorization": f"Token {body['token']}"})

        argv = shlex.split(agent_line.group(1))
        agent = spawn(argv, env={**os.environ}, log=tmp_path / "agent.log")
        try:

            def online() -> bool:
                _, agents = admin.get("/api/agents/")
                return any(a["status"] == "online" for a in agents["results"])

            wait_for(online, timeout=30, what="the pasted agent online")
        finally:
            kill_group(agent, signal.SIGTERM)
    finally:
        kill_group(make, signal.SIGTERM)
