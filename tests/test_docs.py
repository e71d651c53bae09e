"""The docs stay true to the code: the plugin guide (docs/plugins.md) to core/hookspecs.py and to
the imports it tells plugin authors to write; every setting and every command is documented; the
example plugin works."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel

from adapterdeck.core import evaluators, formats, hookspecs, methods, objectives, trackers
from adapterdeck.core.config import RunConfig
from adapterdeck.registry.settings import RegistrySettings
from adapterdeck.serve.settings import ServeSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"
TESTS = ROOT / "tests"
EXAMPLE = ROOT / "examples" / "adapterdeck-sharegpt"


def _hooks() -> dict[str, Callable[..., Any]]:
    """Every hook specification in core/hookspecs.py, by name."""
    return {
        name: fn
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, "adapterdeck_spec")
    }


HOOKS = _hooks()


def _def_lines(fn: Callable[..., Any]) -> str:
    """The ``def name(...) -> None:`` line(s) of a function, exactly as written in its source."""
    lines = textwrap.dedent(inspect.getsource(fn)).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def "))
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith(":"))
    return "\n".join(lines[start : end + 1])


def _sections(text: str, level: str) -> dict[str, str]:
    """The text under each heading of ``level`` ("##" or "###"), up to the next heading as deep or less.

    Lines inside fenced code blocks are never headings (a ``# comment`` is not one).
    """
    found: dict[str, str] = {}
    current: str | None = None
    in_fence = False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"(#+) (.+?)\s*$", line)) and len(m[1]) <= len(level):
            current = m[2] if len(m[1]) == len(level) else None
            if current is not None:
                found[current] = ""
            continue
        if current is not None:
            found[current] += line
    return found


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def test_there_are_hooks() -> None:
    assert set(HOOKS) >= {"register_formats", "register_methods", "register_evaluators"}


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_each_hook_is_documented(doc: str, hook: str) -> None:
    hooks_section = _sections(doc, "##").get("Hooks")
    assert hooks_section is not None, "docs/plugins.md has no '## Hooks' section"
    section = _sections(hooks_section, "###").get(hook)
    assert section is not None, f"docs/plugins.md has no '### {hook}' heading under '## Hooks'"
    signature = _def_lines(HOOKS[hook])
    assert signature in doc.splitlines() or f"\n{signature}\n" in doc, (
        f"docs/plugins.md lacks the line {signature!r}"
    )
    assert f"```python\n@hookimpl\n{signature}\n" in section, (
        f"the '### {hook}' section must start its example with the exact signature:\n@hookimpl\n{signature}"
    )


def test_documented_hooks_exist(doc: str) -> None:
    documented = set(_sections(_sections(doc, "##")["Hooks"], "###"))
    assert documented == set(HOOKS), "docs/plugins.md documents hooks that core/hookspecs.py does not have"


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_each_hook_has_a_test(hook: str) -> None:
    pattern = re.compile(rf"^\s*(?:async\s+)?def test_hook_{re.escape(hook)}(?:_\w*)?\s*\(", re.M)
    files = [p for p in TESTS.rglob("*.py") if p.resolve() != Path(__file__).resolve()]
    assert any(pattern.search(p.read_text(encoding="utf-8")) for p in files), (
        f"no test named test_hook_{hook} under tests/"
    )


@pytest.mark.parametrize(
    "obj",
    [
        formats.DataFormat,
        formats.Message,
        formats.Conversation,
        formats.conversation_problems,
        formats.misplaced_system,
        formats.json_type_name,
        methods.MethodParams,
        methods.TuningMethod,
        objectives.ObjectiveParams,
        objectives.TrainerParts,
        objectives.TrainingObjective,
        evaluators.EvalSample,
        evaluators.Evaluator,
        trackers.TrackerParams,
        trackers.RunStart,
        trackers.TrackedRun,
        trackers.Tracker,
    ],
    ids=lambda obj: obj.__name__,
)
def test_base_classes_are_copied_faithfully(doc: str, obj: Any) -> None:
    assert inspect.getsource(obj).rstrip() in doc, (
        f"docs/plugins.md must show {obj.__name__} exactly as in {inspect.getsourcefile(obj)}"
    )


def test_python_examples_compile(doc: str) -> None:
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", doc, flags=re.M | re.S)
    assert blocks
    for _, block in blocks:
        code = textwrap.dedent(block)
        if code.rstrip().endswith(":"):  # a bare signature
            code += "    ...\n"
        compile(code, str(DOC), "exec")


def test_docs_point_at_the_example(doc: str) -> None:
    assert "examples/adapterdeck-sharegpt" in doc
    assert (EXAMPLE / "pyproject.toml").is_file()
    assert (EXAMPLE / "README.md").is_file()


@pytest.fixture
def sharegpt(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import adapterdeck_sharegpt

    return adapterdeck_sharegpt


def test_example_format_converts_a_record(sharegpt: ModuleType) -> None:
    fmt = sharegpt.ShareGPTFormat()
    record = {
        "id": "ex-1",
        "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
    }
    assert fmt.detect(record)
    assert fmt.problems(record) == []
    conv = fmt.to_conversation(record)
    assert isinstance(conv, formats.Conversation)
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.reference == "4"
    assert dict(conv.meta) == {"id": "ex-1"}


def test_example_format_lists_every_problem(sharegpt: ModuleType) -> None:
    fmt = sharegpt.ShareGPTFormat()
    assert not fmt.detect({"messages": []})
    assert fmt.problems({"conversations": "hi"}) == ["'conversations' must be an array, got string"]
    bad = {"conversations": [3, {"from": "bot", "value": ""}, {"from": "gpt"}]}
    assert fmt.problems(bad) == [
        "message 1: must be an object, got number",
        "message 2: unknown 'from' value 'bot' (expected one of system, human, user, gpt, assistant)",
        "message 2: empty value",
        "message 3: missing 'value'",
    ]
    assert fmt.problems({"conversations": [{"from": "user", "value": "hi"}]}) == ["no assistant turn"]


def test_example_json_fields(sharegpt: ModuleType) -> None:
    from adapterdeck.core.evaluators import EvalSample

    evaluator = sharegpt.JsonFields()
    assert evaluator.name == "json_fields"
    assert evaluator.higher_is_better and evaluator.needs_generation

    def score(reference: str, prediction: str | None) -> float:
        return evaluator.score(EvalSample(prompt=[], reference=reference, prediction=prediction))

    ref = '{"a": 1, "b": [1, 2], "c": {"d": true}, "e": null}'
    assert score(ref, ref) == 1.0
    assert score(ref, ' {"e": null, "c": {"d": true}, "b": [1, 2], "a": 1.0, "extra": 0} ') == 1.0
    assert score(ref, '{"a": 1, "b": [2, 1], "c": {"d": 1}}') == 0.25  # order counts, true is not 1
    assert score('{"a": 1, "b": 2}', '{"a": 1, "b": 3}') == 0.5
    assert score('{"a": 1}', '{"a": "1"}') == 0.0
    # Not a JSON object, on either side: 0.0.
    assert [score(ref, p) for p in ("not json", "[1]", '"s"', "", '{"a": NaN}', None)] == [0.0] * 6
    assert [score(r, "{}") for r in ("not json", "[]", "NaN")] == [0.0] * 3
    # A reference without fields: only an empty object matches it.
    assert score("{}", " {} ") == 1.0
    assert score("{}", '{"a": 1}') == 0.0


def test_example_registers_through_the_plugin_manager(
    sharegpt: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterdeck.core import plugins

    monkeypatch.setenv(plugins.LOAD_ENV, "")  # only the built-ins, even if the example is installed
    plugins.reset()
    try:
        name = plugins.register_plugin(sharegpt)
        cat = plugins.catalog()
        assert cat.problems == []
        assert isinstance(cat.format("sharegpt"), sharegpt.ShareGPTFormat)
        assert isinstance(cat.evaluator("json_fields"), sharegpt.JsonFields)
        assert cat.evaluators["json_valid"].origin.label == "built-in"
        assert cat.formats["sharegpt"].origin.plugin == name
        assert {"chat", "alpaca"} <= set(cat.formats)
    finally:
        plugins.reset()


# -- the imports plugin authors are told to write ------------------------------------------------


def _author_imports() -> list[tuple[str, str, str]]:
    """``(module, name, where)`` for every ``from adapterdeck... import name`` in the plugin guide's
    code and the example plugins."""
    sources = {str(DOC.relative_to(ROOT)): DOC.read_text(encoding="utf-8")}
    for path in sorted((ROOT / "examples").glob("*/*.py")):
        sources[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    found = []
    for where, text in sources.items():
        blocks = (
            re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.M | re.S)
            if where.endswith(".md")
            else [("", text)]
        )
        for _, block in blocks:
            code = textwrap.dedent(block)
            if code.rstrip().endswith(":"):
                code += "    ...\n"
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adapterdeck."):
                    found.extend((node.module, alias.name, where) for alias in node.names)
    return sorted(set(found))


AUTHOR_IMPORTS = _author_imports()


def test_plugin_authors_are_told_what_to_import() -> None:
    assert ("adapterdeck.core", "hookimpl", "docs/plugins.md") in AUTHOR_IMPORTS
    assert {module for module, _, _ in AUTHOR_IMPORTS} >= {
        "adapterdeck.core.formats",
        "adapterdeck.core.methods",
        "adapterdeck.core.evaluators",
        "adapterdeck.core.plugins",
    }


@pytest.mark.parametrize(("module", "name", "where"), AUTHOR_IMPORTS, ids=lambda v: str(v))
def test_each_import_plugin_authors_write_works(module: str, name: str, where: str) -> None:
    imported = importlib.import_module(module)
    assert hasattr(imported, name), f"{where}: from {module} import {name}: {module} has no {name}"


# -- every setting is documented ------------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``X`` or ``X | None``), if it holds one."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        held = [_model_of(a) for a in typing.get_args(annotation)]
        return next((m for m in held if m is not None), None)
    if typing.get_origin(annotation) is None and isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseModel) else None
    return None


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """The dotted key of every value a config file sets, in nested models too (``data.mix.ratio``);
    a mapping of models (``tenant_limits``) is one key."""
    found = []
    for name, field in model.model_fields.items():
        nested = _model_of(field.annotation)
        found.extend([prefix + name] if nested is None else config_keys(nested, f"{prefix}{name}."))
    return found


def config_groups(model: type[BaseModel], prefix: str = "") -> set[str]:
    """The dotted keys of the nested models themselves (``data.mix``), which a row may describe too."""
    found: set[str] = set()
    for name, field in model.model_fields.items():
        nested = _model_of(field.annotation)
        if nested is not None:
            found |= {prefix + name, *config_groups(nested, f"{prefix}{name}.")}
    return found


def env_variables(settings: type[BaseModel]) -> list[str]:
    prefix = settings.model_config.get("env_prefix", "")
    return [f"{prefix}{name}".upper() for name in settings.model_fields]


@dataclass(frozen=True)
class Settings:
    """A settings model and the table that documents it: a heading of README.md or docs/*.md."""

    keys: list[str]
    groups: set[str]
    doc: Path
    heading: str

    def documented(self) -> set[str]:
        """Every ``code`` span in the first column of the tables under the heading."""
        text = self.doc.read_text(encoding="utf-8")
        section = _sections(text, "###").get(self.heading)
        assert section is not None, f"{self.where()} is missing"
        keys: set[str] = set()
        for line in section.splitlines():
            if line.startswith("|") and not re.fullmatch(r"\|[-| ]+\|", line.strip()):
                keys |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
        return keys

    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}, '### {self.heading}'"


SETTINGS = {
    "run config": Settings(config_keys(RunConfig), config_groups(RunConfig), README, "Run config"),
    "serve.yaml": Settings(
        config_keys(ServeSettings), config_groups(ServeSettings), OPERATIONS, "serve.yaml"
    ),
    "registry": Settings(env_variables(RegistrySettings), set(), OPERATIONS, "The registry's environment"),
}


def test_the_settings_are_found() -> None:
    assert {"train.epochs", "data.mix.ratio", "method.name", "publish"} <= set(SETTINGS["run config"].keys)
    serve = set(SETTINGS["serve.yaml"].keys)
    assert {"vllm.port", "limits.requests_per_minute", "tenant_limits", "finetune.workdir"} <= serve
    assert "ADAPTERDECK_HOME" in SETTINGS["registry"].keys
    # `adapterdeck worker` reads the file `serve` reads.
    assert config_keys(WorkerSettings) == SETTINGS["serve.yaml"].keys


@pytest.mark.parametrize(
    ("kind", "key"), [(kind, key) for kind, s in SETTINGS.items() for key in s.keys], ids=lambda v: str(v)
)
def test_each_setting_is_documented(kind: str, key: str) -> None:
    settings = SETTINGS[kind]
    assert key in settings.documented(), f"{settings.where()} has no row for `{key}`"


@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_each_documented_setting_exists(kind: str) -> None:
    settings = SETTINGS[kind]
    unknown = settings.documented() - set(settings.keys) - settings.groups
    assert unknown == set(), f"{settings.where()} documents settings that do not exist"


# -- every command is documented ------------------------------------------------------------------


def _commands() -> list[str]:
    """Every command of ``adapterdeck``, with the plugins' (registry, serve, ...), as typed."""
    import typer.main

    from adapterdeck.core.cli import app

    found = []

    def walk(command: Any, path: str) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            if not command.hidden:
                found.append(path)
            return
        for name, sub in sorted(subcommands.items()):
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "adapterdeck")
    return found


COMMANDS = _commands()


def test_the_commands_are_found() -> None:
    assert {
        "adapterdeck train",
        "adapterdeck registry publish",
        "adapterdeck serve",
        "adapterdeck worker",
    } <= set(COMMANDS)
    assert "adapterdeck experiment show" in COMMANDS and "adapterdeck registry base add" in COMMANDS


@pytest.fixture(scope="module")
def all_docs() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in [README, *sorted((ROOT / "docs").glob("*.md"))])


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_is_documented(all_docs: str, command: str) -> None:
    written = re.compile(rf"(?<![\w.-]){re.escape(command)}(?![\w-])")
    assert written.search(all_docs), f"neither README.md nor docs/*.md shows `{command}`"


# -- docs/architecture.md: the map names every module, and only modules that exist ---------------

ARCHITECTURE = ROOT / "docs" / "architecture.md"
LAYERS = ("core", "plugins", "registry", "serve")


def _modules_on_disk() -> set[str]:
    found = set()
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            relative = path.relative_to(ROOT)
            if path.name != "__init__.py" and "migrations" not in relative.parts:
                found.add(relative.as_posix())
    return found


def _modules_on_the_map() -> set[str]:
    """Every module the "Every module" section names: ``name.py`` in a layer's paragraph, and in a
    bullet that starts with a subfolder (``- `experiments/`: ...``) under that subfolder."""
    section = ARCHITECTURE.read_text().split("## Every module", 1)[1].split("\n## ", 1)[0]
    named, layer, folder = set(), None, ""
    for line in section.splitlines():
        start = re.match(r"`(\w+)/`:", line)
        if start and start.group(1) in LAYERS:
            layer, folder = start.group(1), ""
        bullet = re.match(r"- `(\w+)/`:", line)
        if bullet:
            folder = bullet.group(1) + "/"
        elif line.startswith("- "):
            folder = ""
        for name in re.findall(r"`(\w+\.py)`", line):
            named.add(f"{layer}/{folder}{name}")
    return named


def test_the_architecture_page_names_every_module() -> None:
    missing = sorted(_modules_on_disk() - _modules_on_the_map())
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_the_architecture_page_names_only_modules_that_exist() -> None:
    paths = set(re.findall(r"`((?:core|plugins|registry|serve)/[\w/]+\.py)`", ARCHITECTURE.read_text()))
    gone = sorted((_modules_on_the_map() | paths) - _modules_on_disk())
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"
