"""The authorization matrix (issue 13, Build 12): every URL in the URLconf, API and pages, asked
about user B's objects as anonymous, as agent A, as user A (not staff) and as B, the owner.

- anonymous: 401 on the API, a redirect to the login form on the pages;
- agent A's X-Agent-Token on a human endpoint: 401 or 403 (pages: the login form);
- user A: 404 on B's objects (a list does not show them; a body naming them is refused);
- user B: 2xx (pages: 200, or the redirect that follows an action);
- on the agent API, a human token is 401, agent A on B's command or deployment 404.

`ROUTES` has one line per URL pattern; the test fails when the URLconf has a pattern without
one, so a new URL must say who may reach it. Each check runs in a savepoint that is rolled
back, so B's destructive actions (delete, revoke) do not change what the next check sees.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.core.signals import request_finished
from django.db import close_old_connections, transaction
from django.test import TestCase
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from tether.accounts.services import create_api_token
from tether.commands import services as command_services
from tether.commands.models import CommandTemplate
from tether.deploy import services as deploy_services
from tether.deploy.models import Deployment
from tether.fleet import services as fleet_services

from .base import User

API, PAGE, AGENT, PUBLIC, ADMIN = "api", "page", "agent", "public", "admin"


@dataclass(frozen=True)
class Route:
    kind: str
    methods: tuple[str, ...]
    # Which of B's objects each placeholder of the pattern names ({pk}: `pk="agent"`).
    objects: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None  # `{agent}`-style strings become B's ids
    owner: int | None = None  # B's status when not 2xx by nature (documented per line)
    mine: bool = False  # creates the caller's own object: nothing of B's for A to reach


def api(*methods: str, **kw: Any) -> Route:
    return Route(API, methods, **_split(kw))


def page(*methods: str, **kw: Any) -> Route:
    return Route(PAGE, methods, **_split(kw))


def agent(*methods: str, **kw: Any) -> Route:
    return Route(AGENT, methods, **_split(kw))


def public(*methods: str) -> Route:
    return Route(PUBLIC, methods)


def _split(kw: dict[str, Any]) -> dict[str, Any]:
    own = {"body", "owner", "mine"}
    return {
        "objects": {k: v for k, v in kw.items() if k not in own},
        **{k: v for k, v in kw.items() if k in own},
    }


NO_BODY: dict[str, Any] = {}
# B passes authorization and meets the state check: B's agent never polled (offline) and its
# server has no SSH key, so lifecycle actions cannot start; B's run and rollout ended at once
# (their only target is offline).
NO_SSH_KEY = FINISHED = 409

ROUTES: dict[str, Route] = {
    # Public on purpose
    "healthz": public("GET"),
    "healthz/": public("GET"),
    "metrics": public("GET"),  # restricted by network and token, not by user (monitoring.py)
    "metrics/": public("GET"),
    "api/schema/": public("GET"),
    "static/web/{path}": public("GET"),
    "login/": public("GET"),
    "logout/": public("POST"),
    "api/auth/token/": public("POST"),
    "api/agents/register/": public("POST"),
    "api/agents/files/{filename}/": public("GET"),
    "admin/": Route(ADMIN, ("GET",)),  # Django's admin: staff only, its own login
    # Agent API
    "api/agents/heartbeat/": agent("POST", body=NO_BODY),
    "api/agents/files/manifest.json/": agent("GET"),
    "api/agents/poll_commands/": agent("GET"),
    "api/agents/poll/": agent("GET"),
    "api/agents/command/": agent("POST"),
    "api/agents/command/{command_id}/progress/": agent("POST", command_id="command", body={}),
    "api/agents/command/{command_id}/result/": agent(
        "POST", command_id="command", body={"success": True}
    ),
    "api/agents/commands/{command_id}/progress/": agent("POST", command_id="command", body={}),
    "api/agents/commands/{command_id}/result/": agent(
        "POST", command_id="command", body={"success": True}
    ),
    "api/agents/deployment/{deployment_id}/progress/": agent(
        "POST", deployment_id="deployment", body={"log": "x"}
    ),
    "api/agents/deployments/{deployment_id}/progress/": agent(
        "POST", deployment_id="deployment", body={"log": "x"}
    ),
    # Human API
    "api/auth/tokens/": api("GET", "POST", mine=True, body={"name": "n"}),
    "api/auth/tokens/{pk}/": api("DELETE", pk="token"),
    "api/audit/": api("GET", mine=True),  # each sees their own events (staff: all)
    "api/agents/": api("GET"),
    "api/agents/{pk}/": api("GET", "PATCH", pk="agent", body={"tags": ["b"]}),
    "api/servers/": api("GET", "POST", mine=True, body={"name": "new", "host": "10.1.1.1"}),
    "api/servers/{pk}/": api("GET", "PATCH", "DELETE", pk="server", body={"name": "renamed"}),
    "api/servers/{pk}/forget_host_key/": api("POST", pk="server"),
    "api/servers/{pk}/rotate_token/": api("POST", pk="server"),
    "api/servers/{pk}/install/": api("POST", pk="server", owner=NO_SSH_KEY),
    "api/commands/{command_id}/stream/": api("GET", command_id="command"),
    "api/runs/{run_id}/stream/": api("GET", run_id="run"),
    "api/deployments/{deployment_id}/stream/": api("GET", deployment_id="deployment"),
    "api/agents/command-templates/": api(
        "GET", "POST", mine=True, body={"name": "t2", "command": "uptime"}
    ),
    "api/agents/command-templates/{pk}/": api(
        "GET", "PATCH", "DELETE", pk="template", body={"description": "d"}
    ),
    "api/agents/{pk}/commands/": api("GET", pk="agent"),
    "api/agents/{pk}/send_command/": api("POST", pk="agent", body={"command": "true"}),
    "api/commands/{pk}/": api("GET", pk="command"),
    "api/commands/{pk}/cancel/": api("POST", pk="command"),
    "api/runs/": api("GET", "POST", body={"command": "true", "targets": {"agents": ["{agent}"]}}),
    "api/runs/{pk}/": api("GET", pk="run"),
    "api/runs/{pk}/cancel/": api("POST", pk="run", owner=FINISHED),
    "api/agents/check_status/": api("POST", body={"targets": {"agents": ["{agent}"]}}),
    "api/agents/{agent_id}/check_status/": api("POST", agent_id="agent"),
    "api/agents/{pk}/update_certificate/": api("POST", pk="agent", body={"verify_ssl": False}),
    "api/agents/{pk}/deployments/": api("GET", pk="agent"),
    "api/agents/{pk}/start/": api("POST", pk="agent", owner=NO_SSH_KEY),
    "api/agents/{pk}/stop/": api("POST", pk="agent", owner=NO_SSH_KEY),
    "api/agents/{pk}/upgrade/": api("POST", pk="agent", owner=NO_SSH_KEY),
    "api/deployments/": api("GET"),
    "api/deployments/{pk}/": api("GET", pk="deployment"),
    "api/deployments/{pk}/cancel/": api("POST", pk="deployment"),
    "api/rollouts/": api("GET", "POST", body={"targets": {"agents": ["{agent}"]}, "batch_size": 1}),
    "api/rollouts/{pk}/": api("GET", pk="rollout"),
    "api/rollouts/{pk}/cancel/": api("POST", pk="rollout", owner=FINISHED),
    # Pages
    "": page("GET"),
    "fleet/rows/": page("GET"),
    "agents/{agent_id}/": page("GET", agent_id="agent"),
    "agents/{agent_id}/status/": page("GET", agent_id="agent"),
    "agents/{agent_id}/history/": page("GET", agent_id="agent"),
    "agents/{agent_id}/run/": page("POST", agent_id="agent", body={"command": "true"}),
    "agents/{agent_id}/template-params/": page("GET", agent_id="agent"),
    "agents/{agent_id}/upgrade/": page("POST", agent_id="agent"),
    "agents/{agent_id}/stop/": page("POST", agent_id="agent"),
    "agents/{agent_id}/start/": page("POST", agent_id="agent"),
    "agents/{agent_id}/certificate/": page("POST", agent_id="agent", body={"verify_ssl": ""}),
    "commands/{command_id}/": page("GET", command_id="command"),
    "commands/{command_id}/cancel/": page("POST", command_id="command"),
    "commands/{command_id}/console/": page("GET", command_id="command"),
    "commands/{command_id}/stdout.txt": page("GET", command_id="command"),
    "commands/{command_id}/stderr.txt": page("GET", command_id="command"),
    "runs/": page("GET"),
    "runs/agents/": page("GET"),
    "runs/template-params/": page("GET"),
    "runs/{run_id}/": page("GET", run_id="run"),
    "runs/{run_id}/cancel/": page("POST", run_id="run"),
    "deployments/{deployment_id}/": page("GET", deployment_id="deployment"),
    "servers/": page("GET"),
    "servers/{server_id}/rotate/": page("POST", server_id="server"),
    "servers/{server_id}/install/": page("POST", server_id="server"),
    "servers/{server_id}/delete/": page("POST", server_id="server"),
    "templates/": page("GET"),
    "templates/{template_id}/": page("GET", template_id="template"),
    "templates/{template_id}/delete/": page("POST", template_id="template"),
    "account/tokens/": page("GET"),
    "audit/": page("GET"),
    "account/tokens/{token_id}/revoke/": page("POST", token_id="token"),
}


def url_patterns() -> Iterator[str]:
    """Every pattern of the URLconf as a template: `api/agents/{pk}/send_command/`."""

    def walk(patterns: list[Any], prefix: str) -> Iterator[str]:
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                if route == "admin/":
                    yield route
                else:
                    yield from walk(pattern.url_patterns, route)
            elif isinstance(pattern, URLPattern):
                yield template_of(route)

    yield from walk(get_resolver().url_patterns, "")


def template_of(route: str) -> str:
    route = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", route)  # router regexes
    route = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)  # path converters
    return route.replace("^", "").replace("$", "")


def text(response: Any) -> str:
    """The status and (not for a live stream) the body, for a failure's message."""
    body = b"<stream>" if getattr(response, "streaming", False) else response.content[:300]
    return f"{response.status_code} {body!r}"


class AuthorizationMatrixTestCase(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.user_a = User.objects.create_user("user-a")
        cls.user_b = User.objects.create_user("user-b")
        cls.token_a = create_api_token(user=cls.user_a, name="a", expires_in_days=None)[1]
        cls.token_b = create_api_token(user=cls.user_b, name="b", expires_in_days=None)[1]
        server_a, _ = fleet_services.create_server(owner=cls.user_a, name="a", host="10.0.0.1")
        cls.agent_a_token = fleet_services.register_agent(server=server_a, hostname="a").token

        server, _ = fleet_services.create_server(owner=cls.user_b, name="b", host="10.0.0.2")
        registration = fleet_services.register_agent(server=server, hostname="b")
        agent = registration.agent
        cls.agent_b_token = registration.token
        command = command_services.queue_command(agent=agent, command="true", user=cls.user_b)
        template = CommandTemplate.objects.create(owner=cls.user_b, name="t", command="uptime")
        deployment = deploy_services.create_deployment(
            server=server, agent=agent, kind=Deployment.Kind.UPGRADE, method="agent", user=None
        )
        revocable, _ = create_api_token(user=cls.user_b, name="spare", expires_in_days=None)
        client = APIClient(HTTP_AUTHORIZATION=f"Token {cls.token_b}")
        run = client.post(
            "/api/runs/", {"command": "true", "targets": {"agents": [agent.pk]}}, format="json"
        )
        rollout = client.post(
            "/api/rollouts/", {"targets": {"agents": [agent.pk]}, "batch_size": 1}, format="json"
        )
        assert run.status_code == 201 and rollout.status_code == 201, (run.json(), rollout)
        cls.objects = {
            "server": server.pk,
            "agent": agent.pk,
            "command": command.pk,
            "template": template.pk,
            "deployment": deployment.pk,
            "token": revocable.pk,
            "run": run.json()["id"],
            "rollout": rollout.json()["id"],
        }

    def test_every_url_in_the_urlconf_has_an_entry(self) -> None:
        missing = sorted(set(url_patterns()) - set(ROUTES))
        self.assertEqual(missing, [], "add a line to ROUTES for each of these")
        stale = sorted(set(ROUTES) - set(url_patterns()))
        self.assertEqual(stale, [], "these entries name no URL any more")

    def test_each_url_refuses_all_but_the_owner(self) -> None:
        for pattern, route in ROUTES.items():
            if route.kind in (PUBLIC, ADMIN):
                continue
            for method in route.methods:
                with self.subTest(pattern=pattern, method=method):
                    self.check(pattern, route, method)

    def test_the_admin_is_for_staff_only(self) -> None:
        for client in (self.anonymous(), self.session(self.user_a), self.session(self.user_b)):
            response = client.get("/admin/")
            self.assertEqual(response.status_code, 302)
            self.assertIn("/admin/login/", response["Location"])

    # The checks ------------------------------------------------------------------------

    def check(self, pattern: str, route: Route, method: str) -> None:
        url = "/" + pattern.format(**{k: self.objects[v] for k, v in route.objects.items()})
        body = self.body(route)
        if route.kind == AGENT:
            self.expect_agent(url, route, method, body)
        elif route.kind == API:
            self.expect_api(url, route, method, body)
        else:
            self.expect_page(url, route, method, body)

    def expect_api(self, url: str, route: Route, method: str, body: Any) -> None:
        self.assertEqual(self.ask(self.anonymous(), method, url, body).status_code, 401)
        agent = self.ask(self.as_agent(self.agent_a_token), method, url, body)
        self.assertIn(agent.status_code, (401, 403))
        if not route.mine:
            other = self.ask(self.as_user(self.token_a), method, url, body)
            if route.objects or method != "GET":
                self.assertEqual(other.status_code, 404, other.content)
            else:
                self.assertNotIn(self.owned_id(url), self.listed_ids(other))
        owner = self.ask(self.as_user(self.token_b), method, url, body)
        if route.owner is not None:
            self.assertEqual(owner.status_code, route.owner, text(owner))
        else:
            self.assertTrue(200 <= owner.status_code < 300, text(owner))
        if not route.objects and method == "GET" and not route.mine:
            self.assertIn(self.owned_id(url), self.listed_ids(owner))

    def expect_page(self, url: str, route: Route, method: str, body: Any) -> None:
        for client in (self.anonymous(), self.as_agent(self.agent_a_token)):
            response = self.ask(client, method, url, body, json=False)
            self.assertEqual(response.status_code, 302)
            self.assertTrue(response["Location"].startswith("/login/"), response["Location"])
        if route.objects:
            other = self.ask(self.session(self.user_a), method, url, body, json=False)
            self.assertEqual(other.status_code, 404)
        owner = self.ask(self.session(self.user_b), method, url, body, json=False)
        self.assertTrue(200 <= owner.status_code < 300 or owner.status_code == 302, owner)
        if owner.status_code == 302:
            self.assertFalse(owner["Location"].startswith("/login/"), owner["Location"])

    def expect_agent(self, url: str, route: Route, method: str, body: Any) -> None:
        self.assertEqual(self.ask(self.anonymous(), method, url, body).status_code, 401)
        human = self.ask(self.as_user(self.token_b), method, url, body)
        self.assertEqual(human.status_code, 401, human.content)
        if route.objects:
            other = self.ask(self.as_agent(self.agent_a_token), method, url, body)
            self.assertEqual(other.status_code, 404, other.content)
        owner = self.ask(self.as_agent(self.agent_b_token), method, url, body)
        self.assertTrue(200 <= owner.status_code < 300, text(owner))

    # Helpers ---------------------------------------------------------------------------

    def ask(self, client: Any, method: str, url: str, body: Any, json: bool = True) -> Any:
        """One request, its effects rolled back (the next check sees the same objects)."""
        savepoint = transaction.savepoint()
        try:
            call = getattr(client, method.lower())
            if method == "GET":
                response = call(url)
            elif json:
                response = call(url, body, format="json")
            else:
                response = call(url, body or {})
            if getattr(response, "streaming", False):
                # A live stream: its status is the answer. Closed as Django's test client
                # closes a response, without the request_finished handler that would close
                # the test's own database connection (PostgreSQL's: gone for the test).
                request_finished.disconnect(close_old_connections)
                try:
                    response.close()
                finally:
                    request_finished.connect(close_old_connections)
            return response
        finally:
            transaction.savepoint_rollback(savepoint)

    def body(self, route: Route) -> Any:
        if route.body is None:
            return {} if route.kind in (API, AGENT) else None

        def fill(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: fill(v) for k, v in value.items()}
            if isinstance(value, list):
                return [fill(v) for v in value]
            if isinstance(value, str) and re.fullmatch(r"\{\w+\}", value):
                return self.objects[value[1:-1]]
            return value

        return fill(route.body)

    def owned_id(self, url: str) -> int:
        """The id of B's object a list at `url` would show."""
        kinds = {
            "/api/agents/": "agent",
            "/api/servers/": "server",
            "/api/agents/command-templates/": "template",
            "/api/deployments/": "deployment",
            "/api/runs/": "run",
            "/api/rollouts/": "rollout",
            "/api/auth/tokens/": "token",
        }
        return self.objects[kinds[url]]

    def listed_ids(self, response: Any) -> list[int]:
        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        rows = body["results"] if isinstance(body, dict) else body
        return [row["id"] for row in rows]

    def anonymous(self) -> APIClient:
        return APIClient()

    def as_user(self, token: str) -> APIClient:
        return APIClient(HTTP_AUTHORIZATION=f"Token {token}")

    def as_agent(self, token: str) -> APIClient:
        return APIClient(HTTP_X_AGENT_TOKEN=token)

    def session(self, user: Any) -> APIClient:
        client = APIClient()
        client.force_login(user)
        return client
