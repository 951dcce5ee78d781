"""Form input for the pages: the command forms (one agent, many) and the template and server
editors."""

import json
import re
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.http import QueryDict
from rest_framework import exceptions

from tether.commands import command_templates
from tether.commands.api.serializers import MAX_COMMAND_CHARS
from tether.commands.models import CommandTemplate
from tether.commands.selectors import (
    TEMPLATE_NAME_TAKEN,
    template_name_taken,
    templates_visible_to,
)
from tether.fleet.models import Agent, Server
from tether.fleet.selectors import AgentFilter, agents_visible_to, server_name_taken
from tether.fleet.validators import NAME_TAKEN

PARAM_PREFIX = "param_"


class RunCommandForm(forms.Form):
    command = forms.CharField(max_length=MAX_COMMAND_CHARS, required=False, strip=False)
    template = forms.ModelChoiceField(
        queryset=CommandTemplate.objects.none(), required=False, empty_label="(none)"
    )
    timeout = forms.IntegerField(
        min_value=1, max_value=settings.COMMAND_TIMEOUT_MAX, required=False
    )

    def __init__(self, *args: Any, user: AbstractBaseUser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["template"].queryset = templates_visible_to(user).order_by("name")

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        has_command = bool((data.get("command") or "").strip())
        if has_command == bool(data.get("template")):
            raise forms.ValidationError("Give either a command or a template.")
        return data


def chosen_template(user: AbstractBaseUser, value: str) -> CommandTemplate | None:
    """The template a form's `template` field names, if it is one of the user's."""
    if not value.isdigit() or len(value) > 18:
        return None
    return templates_visible_to(user).filter(pk=int(value)).first()


def template_values(template: CommandTemplate, data: QueryDict) -> dict[str, Any]:
    """The parameter values posted as `param_<name>`; blank ones are left out so that the
    template's defaults apply."""
    values: dict[str, Any] = {}
    for spec in template.parameters:
        key = PARAM_PREFIX + spec["name"]
        if spec["type"] == "boolean":
            values[spec["name"]] = key in data
        elif data.get(key, "") != "":
            values[spec["name"]] = data[key]
    return values


def posted_template(template: CommandTemplate | None, data: QueryDict) -> dict[str, Any] | None:
    """The chosen template for the parameter inputs, each showing the value just posted (a
    refused form comes back with what was typed) instead of the template's default."""
    if template is None:
        return None
    parameters = []
    for spec in template.parameters:
        key = PARAM_PREFIX + spec["name"]
        if spec["type"] == "boolean":
            shown = "true" if key in data else "false"
        else:
            shown = data.get(key, spec.get("default"))
        parameters.append({**spec, "default": shown})
    return {"command": template.command, "parameters": parameters}


WHOLE_NUMBER = re.compile(r"\s*-?\d{1,30}\s*")


def _number(text: str) -> int | str:
    """A typed whole number as a number (the API's JSON would carry one); anything else as
    typed, for the API's own validation to refuse with its own message."""
    return int(text) if WHOLE_NUMBER.fullmatch(text) else text.strip()


def run_body(data: QueryDict, user: AbstractBaseUser) -> dict[str, Any]:
    """The `POST /api/runs/` body that the "Run on many" form stands for. The page validates
    it with the API's own `RunInput`, so it refuses what the API refuses, with the API's
    messages. Its targets are the API's union (checked agents, tags, all) plus one the API
    has no word for, "every agent that is <status>", sent as those agents' ids."""
    body: dict[str, Any] = {}
    if data.get("command", "") != "":
        body["command"] = data["command"]
    if data.get("template", "") != "":
        body["template"] = _number(data["template"])
        template = chosen_template(user, data["template"])
        if template is not None:
            body["params"] = template_values(template, data)
    for name in ("timeout", "max_concurrency", "max_errors", "offline"):
        if data.get(name, "").strip():
            body[name] = _number(data[name]) if name != "offline" else data[name]
    body["targets"] = _targets(data, user)
    return body


def _targets(data: QueryDict, user: AbstractBaseUser) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    agents: list[int | str] = [_number(value) for value in data.getlist("agents") if value]
    status = data.get("agent_status", "")
    if status:
        if status not in Agent.Status.values:
            raise exceptions.ValidationError({"agent_status": [f"No such status: {status!r}."]})
        having = AgentFilter(status=status).apply(agents_visible_to(user))
        ids = list(having.values_list("pk", flat=True))
        if not ids:
            raise exceptions.ValidationError({"targets": [f"No agent of yours is {status}."]})
        agents.extend(ids)
    if agents:
        targets["agents"] = list(dict.fromkeys(agents))
    tags = [tag for tag in re.split(r"[,\s]+", data.get("tags", "")) if tag]
    if tags:
        targets["tags"] = list(dict.fromkeys(tags))
    if data.get("all"):
        targets["all"] = True
    return targets


class TemplateForm(forms.ModelForm):
    """A command template; `parameters` is a JSON list, checked by the template rules."""

    parameters = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text='e.g. [{"name": "unit", "type": "string"}]; write {unit} in the command.',
    )

    class Meta:
        model = CommandTemplate
        fields = ["name", "description", "command", "timeout"]
        widgets = {
            "description": forms.TextInput(),
            "command": forms.Textarea(attrs={"rows": 3, "class": "mono"}),
        }

    def __init__(self, *args: Any, owner: AbstractBaseUser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner
        if self.instance.pk and not self.is_bound:
            self.initial["parameters"] = json.dumps(self.instance.parameters, indent=1)

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if template_name_taken(owner=self.owner, name=name, template=self.instance):
            raise forms.ValidationError(TEMPLATE_NAME_TAKEN)
        return name

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        text = (data.get("parameters") or "").strip() or "[]"
        try:
            parameters = json.loads(text)
            data["parameters"] = command_templates.validate_parameters(
                data.get("command", ""), parameters
            )
        except ValueError as exc:  # TemplateError is a ValueError, and so is bad JSON
            self.add_error("parameters", str(exc))
        return data

    def save(self, commit: bool = True) -> CommandTemplate:
        template = super().save(commit=False)
        template.owner = self.owner
        template.parameters = self.cleaned_data["parameters"]
        if commit:
            template.save()
        return template


class SecretTextarea(forms.Textarea):
    """Never renders what was typed: a form shown again with errors does not send the
    private key back to the browser (the operator pastes it again)."""

    def format_value(self, value: Any) -> None:
        return None


class ServerForm(forms.ModelForm):
    """A new server. Its fields are checked by the model's own validators (fleet.validators),
    the same rules and messages as the API's."""

    ssh_private_key = forms.CharField(
        required=False,
        strip=False,
        max_length=16384,
        label="SSH private key",
        widget=SecretTextarea(attrs={"rows": 3, "autocomplete": "off"}),
        help_text="Optional: lets Tether install and start the agent over SSH. Stored encrypted.",
    )

    class Meta:
        model = Server
        fields = ["name", "host", "ssh_user", "ssh_port"]

    def __init__(self, *args: Any, owner: AbstractBaseUser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if server_name_taken(owner=self.owner, name=name, server=self.instance):
            raise forms.ValidationError(NAME_TAKEN)
        return name


NEVER = "never"


class ApiTokenForm(forms.Form):
    """A new API token: a name, and a lifetime from a short list (the server's default
    among them; "never" only when chosen)."""

    name = forms.CharField(max_length=100)
    expires_in_days = forms.ChoiceField(label="Expires")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        default = settings.TOKEN_DAYS
        days = sorted({7, 30, 90, 365, *([default] if default else [])})
        field = self.fields["expires_in_days"]
        field.choices = [(str(d), f"in {d} days") for d in days] + [(NEVER, "never")]
        field.initial = str(default) if default else NEVER

    def clean_expires_in_days(self) -> int | None:
        value = self.cleaned_data["expires_in_days"]
        return None if value == NEVER else int(value)
