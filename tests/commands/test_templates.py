"""Command templates: declared parameters are typed, and every value is shell-quoted."""

import shlex
import subprocess

from django.test import SimpleTestCase

from tether.commands.command_templates import TemplateError, render, validate_parameters


def template(command: str, *parameters: dict) -> tuple[str, list[dict]]:
    return command, validate_parameters(command, list(parameters))


class ValidateParametersTestCase(SimpleTestCase):
    def test_it_works(self) -> None:
        clean = validate_parameters(
            "systemctl {action} {unit}",
            [
                {"name": "action", "type": "choice", "choices": ["start", "stop"]},
                {"name": "unit", "description": "the service"},
            ],
        )
        self.assertEqual(
            clean,
            [
                {
                    "name": "action",
                    "type": "choice",
                    "required": True,
                    "description": "",
                    "choices": ["start", "stop"],
                },
                {"name": "unit", "type": "string", "required": True, "description": "the service"},
            ],
        )

    def test_a_parameter_with_a_default_is_optional(self) -> None:
        [spec] = validate_parameters("tail -n {lines} log", [{"name": "lines", "default": 10}])
        self.assertFalse(spec["required"])
        self.assertEqual(spec["default"], "10")

    def test_it_checks_the_default_against_the_type(self) -> None:
        with self.assertRaises(TemplateError):
            validate_parameters("x {n}", [{"name": "n", "type": "integer", "default": "many"}])

    def test_it_requires_a_list(self) -> None:
        with self.assertRaises(TemplateError):
            validate_parameters("x {n}", {"name": "n"})

    def test_it_refuses_an_unknown_type(self) -> None:
        with self.assertRaises(TemplateError):
            validate_parameters("x {n}", [{"name": "n", "type": "float"}])

    def test_it_refuses_an_unknown_parameter_field(self) -> None:
        with self.assertRaises(TemplateError):
            validate_parameters("x {n}", [{"name": "n", "shell": True}])

    def test_it_refuses_a_bad_or_repeated_name(self) -> None:
        for parameters in (
            [{"name": "1st"}],
            [{"name": "a-b"}],
            [{}],
            [{"name": "n"}, {"name": "n"}],
        ):
            with self.subTest(parameters=parameters), self.assertRaises(TemplateError):
                validate_parameters("x {n} {1st} {a-b}", parameters)

    def test_it_refuses_a_choice_without_choices(self) -> None:
        for choices in (None, [], ["a", 1]):
            with self.subTest(choices=choices), self.assertRaises(TemplateError):
                validate_parameters("x {n}", [{"name": "n", "type": "choice", "choices": choices}])

    def test_it_refuses_a_parameter_missing_from_the_command(self) -> None:
        with self.assertRaises(TemplateError):
            validate_parameters("uptime", [{"name": "n"}])


class RenderTestCase(SimpleTestCase):
    def test_it_works(self) -> None:
        line = render(*template("echo {greeting}", {"name": "greeting"}), {"greeting": "hi"})
        self.assertEqual(line, "echo hi")

    def test_it_quotes_a_value_into_one_word(self) -> None:
        line = render(*template("ls {path}", {"name": "path"}), {"path": "; touch /tmp/pwned"})

        self.assertEqual(shlex.split(line), ["ls", "; touch /tmp/pwned"])

    def test_it_quotes_quotes_and_substitutions(self) -> None:
        for value in ("it's", "$(id)", "`id`", "a\nb", "*", "--help && rm -rf /"):
            with self.subTest(value=value):
                line = render(*template("grep -- {q} f", {"name": "q"}), {"q": value})
                self.assertEqual(shlex.split(line), ["grep", "--", value, "f"])

    def test_it_refuses_a_nul_character(self) -> None:
        """No quoting carries a NUL into an argv: the agent could not run the line."""
        with self.assertRaisesMessage(TemplateError, "NUL"):
            render(*template("grep -- {q} f", {"name": "q"}), {"q": "a\x00b"})

    def test_it_types_integers(self) -> None:
        command, spec = template("head -n {n} f", {"name": "n", "type": "integer"})
        self.assertEqual(render(command, spec, {"n": 5}), "head -n 5 f")
        self.assertEqual(render(command, spec, {"n": "7"}), "head -n 7 f")
        for bad in ("5; id", "five", True, 1.5, None):
            with self.subTest(value=bad), self.assertRaises(TemplateError):
                render(command, spec, {"n": bad})

    def test_it_types_booleans(self) -> None:
        command, spec = template("run --force={force}", {"name": "force", "type": "boolean"})
        self.assertEqual(render(command, spec, {"force": True}), "run --force=true")
        self.assertEqual(render(command, spec, {"force": False}), "run --force=false")
        for bad in ("true", 1, None):
            with self.subTest(value=bad), self.assertRaises(TemplateError):
                render(command, spec, {"force": bad})

    def test_it_types_choices(self) -> None:
        command, spec = template(
            "systemctl {action} nginx",
            {"name": "action", "type": "choice", "choices": ["start", "stop"]},
        )
        self.assertEqual(render(command, spec, {"action": "stop"}), "systemctl stop nginx")
        with self.assertRaises(TemplateError):
            render(command, spec, {"action": "restart; id"})

    def test_it_refuses_a_string_that_is_not_text(self) -> None:
        command, spec = template("echo {s}", {"name": "s"})
        for bad in ([1], {"a": 1}, None, True):
            with self.subTest(value=bad), self.assertRaises(TemplateError):
                render(command, spec, {"s": bad})

    def test_it_refuses_an_overlong_value(self) -> None:
        with self.assertRaises(TemplateError):
            render(*template("echo {s}", {"name": "s"}), {"s": "x" * 4097})

    def test_it_handles_missing_required_parameter(self) -> None:
        with self.assertRaises(TemplateError) as caught:
            render(*template("echo {s}", {"name": "s"}), {})
        self.assertIn("missing parameter: s", str(caught.exception))

    def test_it_refuses_unknown_parameters(self) -> None:
        with self.assertRaises(TemplateError) as caught:
            render(*template("echo {s}", {"name": "s"}), {"s": "a", "extra": "b"})
        self.assertIn("extra", str(caught.exception))

    def test_it_refuses_params_that_are_not_an_object(self) -> None:
        with self.assertRaises(TemplateError):
            render(*template("echo {s}", {"name": "s"}), ["a"])

    def test_it_uses_defaults(self) -> None:
        command, spec = template(
            "tail -n {lines} {file}",
            {"name": "lines", "type": "integer", "default": 10},
            {"name": "file", "default": "/var/log/my app.log"},
        )
        self.assertEqual(
            shlex.split(render(command, spec, {})), ["tail", "-n", "10", "/var/log/my app.log"]
        )
        self.assertEqual(shlex.split(render(command, spec, {"lines": 3}))[2], "3")

    def test_an_optional_parameter_without_default_is_empty(self) -> None:
        command, spec = template("echo {a}", {"name": "a", "required": False})
        self.assertEqual(shlex.split(render(command, spec, {})), ["echo", ""])

    def test_it_leaves_undeclared_placeholders_and_shell_expansions_literal(self) -> None:
        command, spec = template("awk '{print}' {file} && echo ${HOME} {other}", {"name": "file"})
        line = render(command, spec, {"file": "a b"})
        self.assertEqual(line, "awk '{print}' 'a b' && echo ${HOME} {other}")

    def test_a_dollar_brace_of_a_declared_name_stays_a_shell_expansion(self) -> None:
        command, spec = template("echo ${HOME} {HOME}", {"name": "HOME"})
        self.assertEqual(render(command, spec, {"HOME": "x y"}), "echo ${HOME} 'x y'")

    def test_it_substitutes_every_occurrence(self) -> None:
        command, spec = template("cp {f} {f}.bak", {"name": "f"})
        self.assertEqual(shlex.split(render(command, spec, {"f": "a b"})), ["cp", "a b", "a b.bak"])


class QuotedPlaceholderTestCase(SimpleTestCase):
    """A placeholder written inside quotes in the template: the shell must still see the value
    as data. Refusing such a template is as good as rendering it safely."""

    def run_rendered(self, command: str, value: str) -> str | None:
        try:
            command, spec = template(command, {"name": "msg"})
            line = render(command, spec, {"msg": value})
        except TemplateError:
            return None
        done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=10)
        return done.stdout

    def test_it_does_not_run_a_substitution_in_a_double_quoted_placeholder(self) -> None:
        out = self.run_rendered("printf '%s' \"{msg}\"", "$(echo INJECTED)")
        self.assertIn(out, (None, "$(echo INJECTED)"))

    def test_it_does_not_run_a_second_command_from_a_single_quoted_placeholder(self) -> None:
        out = self.run_rendered("printf '%s\\n' '{msg}'", "x; echo INJECTED")
        self.assertIn(out, (None, "x; echo INJECTED\n"))
