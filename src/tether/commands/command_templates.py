"""Command templates: typed `{name}` placeholders, each value shell-quoted on substitution,
so a parameter can never add a second command to the line."""

import re
import shlex
from typing import Any

PARAMETER_TYPES = ("string", "integer", "boolean", "choice")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# `{name}` not preceded by `$`, so `${HOME}` stays a shell expansion.
PLACEHOLDER = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateError(ValueError):
    pass


def quoted_placeholders(command: str, names: set[str]) -> set[str]:
    """Declared placeholders that stand where a quoted value is not safe: inside '...' or
    "..." (single quotes could be closed, `$(...)` in double quotes would still run), after a
    backslash, or anywhere after a heredoc marker (a heredoc body is not parsed as words).
    Such templates are refused."""
    found: set[str] = set()
    heredoc = re.search(r"<<-?\s*['\"]?\w", command)
    if heredoc:
        found |= {m.group(1) for m in PLACEHOLDER.finditer(command, heredoc.start())} & names
    quote = ""  # "", "'" or '"'
    i = 0
    while i < len(command):
        char = command[i]
        if char == "\\" and quote != "'":
            match = PLACEHOLDER.match(command, i + 1)
            if match and match.group(1) in names:
                found.add(match.group(1))
            i += 2
            continue
        if quote and char == "{":
            match = PLACEHOLDER.match(command, i)
            if match and match.group(1) in names and command[i - 1 : i] != "$":
                found.add(match.group(1))
        if char in "'\"" and quote in ("", char):
            quote = "" if quote else char
        i += 1
    return found


def validate_parameters(command: str, parameters: Any) -> list[dict[str, Any]]:
    """Check declared parameters; placeholders that are not declared stay literal text
    (so `awk '{print}'` keeps working)."""
    if not isinstance(parameters, list) or len(parameters) > 50:
        raise TemplateError("parameters must be a list of at most 50 objects")
    seen: set[str] = set()
    clean = []
    for spec in parameters:
        if not isinstance(spec, dict):
            raise TemplateError("each parameter must be an object")
        unknown = set(spec) - {"name", "type", "required", "default", "choices", "description"}
        if unknown:
            raise TemplateError(f"unknown parameter fields: {', '.join(sorted(unknown))}")
        name = spec.get("name")
        if not isinstance(name, str) or not NAME.match(name) or name in seen:
            raise TemplateError(f"parameter name {name!r} is invalid or repeated")
        seen.add(name)
        kind = spec.get("type", "string")
        if kind not in PARAMETER_TYPES:
            raise TemplateError(f"parameter {name}: type must be one of {PARAMETER_TYPES}")
        choices = spec.get("choices")
        if kind == "choice" and (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) for c in choices)
        ):
            raise TemplateError(f"parameter {name}: a choice needs a list of string choices")
        item = {
            "name": name,
            "type": kind,
            "required": bool(spec.get("required", "default" not in spec)),
            "description": str(spec.get("description", ""))[:500],
        }
        if kind == "choice":
            item["choices"] = choices
        if "default" in spec:
            item["default"] = _coerce(item, spec["default"])
        if f"{{{name}}}" not in command:
            raise TemplateError(f"parameter {name} does not appear as {{{name}}} in the command")
        clean.append(item)
    inside = quoted_placeholders(command, seen)
    if inside:
        names = ", ".join(f"{{{name}}}" for name in sorted(inside))
        raise TemplateError(
            f"{names} stands inside quotes, after a backslash or in a heredoc; write it as a "
            "word of its own: each value is quoted for you"
        )
    return clean


def _coerce(spec: dict[str, Any], value: Any) -> str:
    """The value as command-line text, checked against the parameter's type."""
    name, kind = spec["name"], spec["type"]
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TemplateError(f"{name} must be an integer")
        try:
            return str(int(value))
        except ValueError as exc:
            raise TemplateError(f"{name} must be an integer") from exc
    if kind == "boolean":
        if not isinstance(value, bool):
            raise TemplateError(f"{name} must be true or false")
        return "true" if value else "false"
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise TemplateError(f"{name} must be a string")
    text = str(value)
    if len(text) > 4096:
        raise TemplateError(f"{name} is longer than 4096 characters")
    if "\x00" in text:  # no quoting carries a NUL into an argv: the agent could not run it
        raise TemplateError(f"{name} must not contain a NUL character")
    if kind == "choice" and text not in spec["choices"]:
        raise TemplateError(f"{name} must be one of {spec['choices']}")
    return text


def render(command: str, parameters: list[dict[str, Any]], values: Any) -> str:
    """The command line with each declared placeholder replaced by its quoted value."""
    if not isinstance(values, dict):
        raise TemplateError("params must be an object")
    declared = {spec["name"]: spec for spec in parameters}
    if quoted_placeholders(command, set(declared)):
        raise TemplateError("the template has a placeholder where quoting cannot protect it")
    unknown = set(values) - set(declared)
    if unknown:
        raise TemplateError(f"unknown parameters: {', '.join(sorted(unknown))}")
    quoted: dict[str, str] = {}
    for name, spec in declared.items():
        if name in values:
            quoted[name] = shlex.quote(_coerce(spec, values[name]))
        elif "default" in spec:
            quoted[name] = shlex.quote(spec["default"])
        elif spec["required"]:
            raise TemplateError(f"missing parameter: {name}")
        else:
            quoted[name] = "''"

    def substitute(match: re.Match[str]) -> str:
        return quoted.get(match.group(1), match.group(0))

    return PLACEHOLDER.sub(substitute, command)
