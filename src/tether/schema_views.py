"""Stub views for the schema: what the views DRF does not serve answer (the native async
views: the agent's long-poll and the SSE streams; the agent's files), so that fuzzing and
clients see every path. They serve nothing: the URLconf routes to the real views, and
`describe` only tells drf-spectacular's enumerator which stub to read for each."""

from typing import Any

from drf_spectacular.generators import SchemaGenerator as BaseSchemaGenerator
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from drf_spectacular.utils import inline_serializer as inline
from rest_framework import exceptions, serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from tether.commands import agent_api as commands_agent_api
from tether.commands.api import run_stream
from tether.commands.api import stream as stream_views
from tether.deploy.api import views as deploy_views
from tether.fleet import agent_api as fleet_agent_api
from tether.fleet.agent_views import AgentAPIView
from tether.schema import ERROR, ERRORS


def describe(view: Any, stub: type[APIView]) -> None:
    """Let drf-spectacular's enumerator read `stub` for function view `view` (what
    APIView.as_view sets on the views it makes)."""
    view.cls = stub
    view.initkwargs = {}


def handler() -> Any:
    """A new handler each time: extend_schema annotates the function it is given."""

    def refuse(self: APIView, request: Request, *args: Any, **kwargs: Any) -> Response:
        raise exceptions.MethodNotAllowed(request.method)  # the URL routes to the real view

    return refuse


def stream(tag: str, events: str) -> Any:
    """A stream's GET: `text/event-stream` until the object ends; a JSON error when refused."""
    answer = OpenApiResponse(OpenApiTypes.STR, description=f"Server-Sent Events: {events}.")
    return extend_schema(
        operation_id=f"{tag}_stream", responses={(200, "text/event-stream"): answer}, tags=[tag]
    )(handler())


class CommandStreamSchema(APIView):
    get = stream("commands", "`output` {stream, offset, data}, `status`, then `end`")


class RunStreamSchema(APIView):
    get = stream("runs", "progress counts and one row per target as they change, then `end`")


class DeploymentStreamSchema(APIView):
    get = stream("deployments", "log lines and status as they come, then `end`")


POLL_ANSWER = inline(
    "Poll",
    {
        "commands": serializers.ListField(child=serializers.DictField()),
        "cancel": serializers.ListField(child=serializers.IntegerField()),
        "config": serializers.DictField(),
    },
)
POLL_QUERY = [
    OpenApiParameter(
        "wait",
        OpenApiTypes.NUMBER,
        description="Hold the poll up to this many seconds (capped by config) until work comes.",
    ),
    OpenApiParameter("version", OpenApiTypes.STR, description="The agent's version."),
    OpenApiParameter("rpc_port", OpenApiTypes.INT, description="The agent's RPC port, 0-65535."),
]


def poll() -> Any:
    return extend_schema(
        parameters=POLL_QUERY, request=None, responses={200: POLL_ANSWER}, tags=["agent"]
    )(handler())


class PollSchema(AgentAPIView):
    """The long-poll, a heartbeat too: `/api/agents/poll_commands/`, `/poll/` and the original
    system's `/command/` (deprecated) answer alike, whatever the method."""

    get = poll()
    post = poll()


class AgentFileSchema(APIView):
    """main.py and requirements.txt, by exact name; anything else 404."""

    authentication_classes: list[type] = []
    permission_classes = [AllowAny]
    agent_endpoint = True

    get = extend_schema(
        operation_id="agents_files",
        responses={
            (200, "text/plain"): OpenApiResponse(OpenApiTypes.STR, description="the file"),
            404: OpenApiResponse(ERROR, description=ERRORS[404]),
        },
        tags=["agent"],
    )(handler())


describe(stream_views.command_stream, CommandStreamSchema)
describe(run_stream.run_stream, RunStreamSchema)
describe(deploy_views.deployment_stream, DeploymentStreamSchema)
describe(commands_agent_api.poll_commands, PollSchema)
describe(fleet_agent_api.agent_file, AgentFileSchema)


class SchemaGenerator(BaseSchemaGenerator):
    """drf-spectacular's generator, loaded from this module (SPECTACULAR_SETTINGS'
    DEFAULT_GENERATOR_CLASS) so that the stubs above are attached before it walks the URLconf."""
