"""Serializer helpers shared by the human API."""

from typing import Any

from rest_framework import serializers


class StrictInputMixin:
    """Refuse fields the serializer does not know: a typo must not be silently ignored."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            unknown = sorted(set(data) - writable)
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)  # type: ignore[misc]


class StrictBoolean(serializers.BooleanField):
    """JSON true or false only: "yes", 1 or "false" as a string are refused, not guessed."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


TagList = lambda: serializers.ListField(  # noqa: E731
    child=serializers.RegexField(r"^[A-Za-z0-9_.:-]{1,64}$"),
    max_length=50,
    required=False,
)
