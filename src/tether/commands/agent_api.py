"""Agent-facing command endpoints: progress and result (both dialects)."""

from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from tether.agent_views import AgentAPIView, RawText

from . import output, services, states
from .models import Command

S = Command.Status


class ProgressInput(serializers.Serializer):
    stdout = RawText(required=False, allow_null=True)
    stderr = RawText(required=False, allow_null=True)
    offset_stdout = serializers.IntegerField(min_value=0, required=False, allow_null=True)
    offset_stderr = serializers.IntegerField(min_value=0, required=False, allow_null=True)
    encoding = serializers.ChoiceField(choices=["utf-8", "base64"], default="utf-8")
    started_at = serializers.FloatField(required=False, allow_null=True)
    append = serializers.BooleanField(default=True)

    def chunks(self) -> list[output.Chunk]:
        data = self.validated_data
        chunks = []
        for stream in output.STREAMS:
            text = data.get(stream)
            offset = data.get(f"offset_{stream}")
            if text is None:
                continue
            try:
                payload = output.decode_payload(text, data["encoding"])
            except ValueError as exc:
                raise exceptions.ValidationError({stream: [str(exc)]}) from exc
            chunks.append(output.Chunk(stream=stream, data=payload, offset=offset))
        return chunks


class ResultInput(ProgressInput):
    status = serializers.ChoiceField(choices=sorted(states.FINAL), required=False)
    success = serializers.BooleanField(required=False)
    exit_code = serializers.IntegerField(required=False, allow_null=True)
    return_code = serializers.IntegerField(required=False, allow_null=True)
    error = RawText(required=False, allow_null=True)
    stdout_size = serializers.IntegerField(min_value=0, required=False)
    stderr_size = serializers.IntegerField(min_value=0, required=False)
    finished_at = serializers.FloatField(required=False, allow_null=True)
    # The agent dropped output past max_output_bytes before sending it.
    truncated = serializers.BooleanField(default=False)
    append = serializers.BooleanField(default=False)

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        if "status" not in data and "success" not in data:
            raise serializers.ValidationError("a result needs `status` or `success`")
        return data


OK = inline_serializer("AgentOk", {"status": serializers.CharField()})


class CommandProgressView(AgentAPIView):
    @extend_schema(request=ProgressInput, responses={200: OK}, tags=["agent"])
    def post(self, request: Request, command_id: int) -> Response:
        data = ProgressInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            answer = services.record_progress(
                agent=self.get_agent(),
                command_id=command_id,
                chunks=data.chunks(),
                started_at=data.validated_data.get("started_at"),
            )
        except Command.DoesNotExist as exc:
            raise exceptions.NotFound("No such command for this agent.") from exc
        return Response({"status": "ok", **answer})


class CommandResultView(AgentAPIView):
    max_body = settings.MAX_RESULT_BYTES

    @extend_schema(request=ResultInput, responses={200: OK}, tags=["agent"])
    def post(self, request: Request, command_id: int) -> Response:
        data = ResultInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        exit_code = values.get("exit_code", values.get("return_code"))
        error = values.get("error") or ""
        sizes = {
            stream: values[f"{stream}_size"]
            for stream in output.STREAMS
            if f"{stream}_size" in values
        }
        legacy = not sizes and all(values.get(f"offset_{s}") is None for s in output.STREAMS)
        # The older dialect's final result (`append: false`) carries the whole output, which
        # replaces what its offset-less progress calls stored: no doubled output. Its `error`
        # is that output's stderr. A result without output replaces nothing.
        replace = legacy and not values["append"] and values.get("stdout") is not None
        error_as_stderr = legacy and bool(error) and values.get("stderr") is None
        if replace and error_as_stderr:
            values["stderr"] = error
        chunks = data.chunks()
        status = values.get("status") or (S.SUCCEEDED if values["success"] else S.FAILED)
        try:
            services.record_result(
                agent=self.get_agent(),
                command_id=command_id,
                status=status,
                exit_code=exit_code,
                error=error,
                chunks=chunks,
                replace_output=replace,
                error_as_stderr=error_as_stderr and not replace,
                truncated=values["truncated"],
                sizes=sizes,
                started_at=values.get("started_at"),
            )
        except Command.DoesNotExist as exc:
            raise exceptions.NotFound("No such command for this agent.") from exc
        return Response({"status": "ok"})
