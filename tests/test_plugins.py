"""The plugin core: built-ins, hooks, entry points, load errors, ``plugins list``."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from adapterdeck.core import hookimpl
from adapterdeck.core.errors import AdapterdeckError, UnknownNameError
from adapterdeck.core.evaluators import EvalSample, Evaluator
from adapterdeck.core.formats import Conversation, DataFormat, Message
from adapterdeck.core.methods import MethodParams, TuningMethod
from adapterdeck.core.plugins import (
    EvaluatorRegister,
    FormatRegister,
    MethodRegister,
    catalog,
    register_plugin,
    unregister_plugin,
)

from .conftest import ROOT, pip_install, run_cli


class CsvishFormat(DataFormat):
    name = "csvish"
    description = "question,answer in a 'row' field"

    def detect(self, record: Mapping[str, Any]) -> bool:
        return "row" in record

    def problems(self, record: Mapping[str, Any]) -> list[str]:
        return [] if str(record.get("row", "")).count(",") == 1 else ["'row' needs exactly one comma"]

    def to_conversation(self, record: Mapping[str, Any]) -> Conversation:
        q, a = record["row"].split(",")
        return Conversation((Message("user", q), Message("assistant", a)))


class NoopParams(MethodParams):
    rank: int = 4


class NoopMethod(TuningMethod):
    name = "noop"
    served_by = ("peft",)
    params = NoopParams

    def apply(self, model: Any, params: MethodParams) -> Any:
        return model


class LengthEvaluator(Evaluator):
    name = "answer_length"
    higher_is_better = False

    def score(self, sample: EvalSample) -> float:
        return float(len(sample.prediction or ""))


def test_builtins_are_listed(fresh_plugins: None) -> None:
    cat = catalog()
    assert {"chat", "alpaca"} <= set(cat.formats)
    assert cat.formats["chat"].origin.label == "built-in"
    with pytest.raises(UnknownNameError, match="unknown format 'nope'"):
        cat.format("nope")


def test_hook_register_formats(fresh_plugins: None, tmp_path: Path) -> None:
    class Plugin:
        @hookimpl
        def register_formats(self, register: FormatRegister) -> None:
            register.add_format(CsvishFormat())

    register_plugin(Plugin(), name="csvish-plugin")
    try:
        cat = catalog()
        assert cat.formats["csvish"].origin.label == "registered in code"
        # The registered format takes part in detection and validation like a built-in.
        from adapterdeck.core.dataset import validate_file

        path = tmp_path / "rows.jsonl"
        path.write_text('{"row": "hi,hello"}\n{"row": "no comma"}\n')
        report = validate_file(path)
        assert report.format == "csvish"
        assert [(e.line, e.reasons) for e in report.errors] == [(2, ("'row' needs exactly one comma",))]
        assert report.examples[0].as_dicts()[1] == {"role": "assistant", "content": "hello"}
    finally:
        unregister_plugin("csvish-plugin")
    assert "csvish" not in catalog().formats


def test_hook_register_methods(fresh_plugins: None) -> None:
    class BadEngine(NoopMethod):
        name = "bad-engine"
        served_by = ("tgi",)

    class Plugin:
        @hookimpl
        def register_methods(self, register: MethodRegister) -> None:
            register.add_method(NoopMethod())
            register.add_method(BadEngine())

    register_plugin(Plugin(), name="noop-plugin")
    cat = catalog()
    assert cat.method("noop").params().rank == 4
    assert "bad-engine" not in cat.methods
    assert any("must be served by" in p.error for p in cat.problems)


def test_hook_register_evaluators(fresh_plugins: None) -> None:
    class Plugin:
        @hookimpl
        def register_evaluators(self, register: EvaluatorRegister) -> None:
            register.add_evaluator(LengthEvaluator())

    register_plugin(Plugin(), name="length-plugin")
    evaluator = catalog().evaluator("answer_length")
    scores = [evaluator.score(EvalSample([], "ref", prediction=p)) for p in ("ab", "abcd")]
    assert evaluator.aggregate(scores) == 3.0
    assert evaluator.higher_is_better is False


def test_duplicates_wrong_types_misspelled_and_raising_hooks_are_reported(fresh_plugins: None) -> None:
    class Duplicate(CsvishFormat):
        name = "chat"

    class Plugin:
        @hookimpl
        def register_formats(self, register: FormatRegister) -> None:
            register.add_format(Duplicate())  # taken by the built-in
            register.add_format(object())  # type: ignore[arg-type]
            register.add_format(CsvishFormat())  # still registered

    class LateDuplicate:
        @hookimpl(trylast=True)  # asks to run first among the results; must not take a built-in's name
        def register_formats(self, register: FormatRegister) -> None:
            register.add_format(Duplicate())

    class Misspelled:
        @hookimpl
        def register_format(self, register: FormatRegister) -> None:
            raise AssertionError("never called")

    class Raising:
        @hookimpl
        def register_evaluators(self, register: EvaluatorRegister) -> None:
            raise RuntimeError("boom")

    register_plugin(Plugin(), name="dup")
    register_plugin(Misspelled(), name="typo")
    register_plugin(LateDuplicate(), name="late")
    register_plugin(Raising(), name="raiser")
    cat = catalog()
    errors = {(p.plugin, p.error) for p in cat.problems}
    assert ("dup", "format 'chat' is already registered by adapterdeck.plugins.chat (built-in)") in errors
    assert any(p == "dup" and "is not a DataFormat" in e for p, e in errors)
    assert any(
        p == "typo" and "unknown hook 'register_format'" in e and "register_formats" in e for p, e in errors
    )
    assert ("raiser", "register_evaluators raised RuntimeError: boom") in errors
    assert ("late", "format 'chat' is already registered by adapterdeck.plugins.chat (built-in)") in errors
    assert isinstance(cat.format("chat"), DataFormat) and cat.formats["chat"].origin.label == "built-in"
    assert "csvish" in cat.formats


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin package, installed with pip into a directory of its own."""
    target = tmp_path_factory.mktemp("site-example")
    pip_install(ROOT / "examples" / "adapterdeck-sharegpt", target)
    return target


@pytest.fixture(scope="module")
def broken_installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plugin package whose module raises on import, installed with pip."""
    project = tmp_path_factory.mktemp("broken-src")
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "adapterdeck-broken"
            version = "9.9.9"
            [project.entry-points.adapterdeck]
            broken = "adapterdeck_broken"
            empty = "adapterdeck_empty"
            [tool.setuptools]
            py-modules = ["adapterdeck_broken", "adapterdeck_empty"]
            """
        )
    )
    (project / "adapterdeck_broken.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    (project / "adapterdeck_empty.py").write_text(
        "def register_formats(register):\n    pass  # no @hookimpl\n"
    )
    target = tmp_path_factory.mktemp("site-broken")
    pip_install(project, target)
    return target


def plugins_json(*paths: Path, load: str | None = None) -> dict[str, Any]:
    env = {"PYTHONPATH": ":".join(str(p) for p in paths)}
    if load is not None:
        env["ADAPTERDECK_LOAD_PLUGINS"] = load
    result = run_cli("plugins", "list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def names(listing: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(p["kind"], p["name"]): p["source"] for p in listing["plugins"]}


def test_example_package_is_listed_from_its_distribution(example_installed: Path) -> None:
    listing = plugins_json(example_installed)
    found = names(listing)
    assert found[("format", "chat")] == "built-in"
    assert found[("format", "alpaca")] == "built-in"
    assert found[("format", "sharegpt")] == "adapterdeck-sharegpt 0.1.0"
    assert found[("evaluator", "json_fields")] == "adapterdeck-sharegpt 0.1.0"
    assert found[("evaluator", "json_valid")] == "built-in"
    assert listing["errors"] == []


def test_example_format_validates_through_the_cli(example_installed: Path, tmp_path: Path) -> None:
    path = tmp_path / "sg.jsonl"
    path.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
        + "\n"
        + json.dumps({"conversations": [{"from": "robot", "value": "hi"}]})
        + "\n"
    )
    result = run_cli("data", "validate", str(path), "--json", env={"PYTHONPATH": str(example_installed)})
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert report["format"] == "sharegpt"
    assert [e["line"] for e in report["errors"]] == [2]


def test_load_plugins_env_narrows_third_party(example_installed: Path) -> None:
    assert ("format", "sharegpt") not in names(plugins_json(example_installed, load=""))
    assert ("format", "chat") in names(plugins_json(example_installed, load=""))
    assert ("format", "sharegpt") in names(plugins_json(example_installed, load="adapterdeck-sharegpt"))
    assert ("format", "sharegpt") in names(plugins_json(example_installed, load="sharegpt"))
    assert ("format", "sharegpt") in names(plugins_json(example_installed, load=" other , sharegpt "))
    missing = plugins_json(example_installed, load="not-installed")
    assert ("format", "sharegpt") not in names(missing)
    assert any("no installed plugin has that name" in e["error"] for e in missing["errors"])


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_load(
    example_installed: Path, broken_installed: Path, tmp_path: Path
) -> None:
    listing = plugins_json(example_installed, broken_installed)
    found = names(listing)
    assert {("format", "chat"), ("format", "alpaca"), ("format", "sharegpt")} <= set(found)
    errors = {e["plugin"]: e for e in listing["errors"]}
    assert set(errors) == {"adapterdeck-broken:broken", "adapterdeck-broken:empty"}
    error = errors["adapterdeck-broken:broken"]
    assert error["distribution"] == "adapterdeck-broken" and error["version"] == "9.9.9"
    assert "ImportError: this plugin is broken on purpose" in error["error"]
    assert "implements no adapterdeck hook" in errors["adapterdeck-broken:empty"]["error"]

    # The built-ins still work with the broken package installed.
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    result = run_cli("data", "validate", str(path), env={"PYTHONPATH": str(broken_installed)})
    assert result.returncode == 0, result.stdout + result.stderr

    text = run_cli("plugins", "list", env={"PYTHONPATH": str(broken_installed)})
    assert text.returncode == 0
    assert "adapterdeck-broken" in text.stderr and "broken on purpose" in text.stderr


def test_hook_register_commands(fresh_plugins: None) -> None:
    import typer
    from typer.testing import CliRunner

    from adapterdeck.core.plugins import add_plugin_commands

    class Plugin:
        @hookimpl
        def register_commands(self, cli: typer.Typer) -> None:
            @cli.command("hello")
            def hello(name: str) -> None:
                print(f"hello {name}")

    class Broken:
        @hookimpl
        def register_commands(self, cli: typer.Typer) -> None:
            raise RuntimeError("no commands today")

    register_plugin(Plugin(), name="hello-plugin")
    register_plugin(Broken(), name="broken-commands")
    app = typer.Typer()

    @app.callback()
    def root() -> None: ...

    problems = add_plugin_commands(app)
    assert [p.plugin for p in problems] == ["broken-commands"]
    result = CliRunner().invoke(app, ["hello", "world"])
    assert result.exit_code == 0 and "hello world" in result.output
    # adapterdeck's own parts arrive the same way, as built-ins.
    assert {"registry", "serve", "tenant", "demo"} <= {
        (c.name or (c.callback.__name__ if c.callback else "")) for c in app.registered_commands
    } | {g.name for g in app.registered_groups}


def test_hook_publish_run(fresh_plugins: None, tmp_path: Path) -> None:
    from adapterdeck.core.plugins import plugin_manager, publish_run

    calls: list[tuple[Path, str, str | None]] = []

    class Publisher:
        @hookimpl(tryfirst=True)
        def publish_run(self, run_dir: Path, ref: str, alias: str | None) -> str | None:
            calls.append((run_dir, ref, alias))
            return f"{ref}@7" if ref.startswith("mine/") else None

    register_plugin(Publisher(), name="publisher")
    assert publish_run(tmp_path, "mine/model", "prod") == "mine/model@7"
    assert calls == [(tmp_path, "mine/model", "prod")]
    # None passes the run on to the next implementation (here the registry's).
    impls = [i.plugin_name for i in plugin_manager().hook.publish_run.get_hookimpls()]
    assert "adapterdeck:registry" in impls


def test_hook_fetch_adapter(fresh_plugins: None, tmp_path: Path) -> None:
    from adapterdeck.core.plugins import fetch_adapter, plugin_manager

    asked: list[str] = []

    class Fetcher:
        @hookimpl
        def fetch_adapter(self, ref: str) -> tuple[str, Path] | None:
            asked.append(ref)
            return ("mine/model@3", tmp_path) if ref.startswith("mine/") else None

    register_plugin(Fetcher(), name="fetcher")
    assert fetch_adapter("mine/model:prod") == ("mine/model@3", tmp_path)
    assert asked == ["mine/model:prod"]
    # Registered last, it is asked first; None passes the ref on (here to the registry's).
    impls = [i.plugin_name for i in plugin_manager().hook.fetch_adapter.get_hookimpls()]
    assert impls[-1] == "fetcher" and "adapterdeck:registry" in impls


def test_plugins_list_says_when_a_plugin_failed_and_strict_makes_it_an_error(broken_installed: Path) -> None:
    env = {"PYTHONPATH": str(broken_installed)}
    plain = run_cli("plugins", "list", env=env)
    assert plain.returncode == 0, plain.stderr
    assert "2 plugin problem(s); exit status 0 (--strict makes it 1)" in plain.stderr
    strict = run_cli("plugins", "list", "--strict", env=env)
    assert strict.returncode == 1, strict.stderr
    assert "broken on purpose" in strict.stderr and "--strict: exit status 1" in strict.stderr
    as_json = run_cli("plugins", "list", "--json", "--strict", env=env)
    assert as_json.returncode == 1
    assert {e["plugin"] for e in json.loads(as_json.stdout)["errors"]} == {
        "adapterdeck-broken:broken",
        "adapterdeck-broken:empty",
    }
    # Nothing wrong: --strict exits 0 and says nothing more.
    clean = run_cli("plugins", "list", "--strict", env={"ADAPTERDECK_LOAD_PLUGINS": ""})
    assert clean.returncode == 0 and "problem" not in clean.stderr, clean.stderr


def test_a_name_in_load_plugins_that_matches_nothing_names_the_variable_as_its_source(
    example_installed: Path,
) -> None:
    listing = plugins_json(example_installed, load="sharegpt, Not_Installed")
    assert ("format", "sharegpt") in names(listing)
    [error] = listing["errors"]
    assert error["source"] == "ADAPTERDECK_LOAD_PLUGINS" and error["plugin"] == "Not_Installed"
    assert error["distribution"] is None
    assert error["error"].startswith(
        "ADAPTERDECK_LOAD_PLUGINS names 'Not_Installed', but no installed plugin"
    )
    text = run_cli(
        "plugins",
        "list",
        env={"PYTHONPATH": str(example_installed), "ADAPTERDECK_LOAD_PLUGINS": "not-installed"},
    )
    assert "plugin not-installed (ADAPTERDECK_LOAD_PLUGINS):" in text.stderr, text.stderr


def test_an_unknown_method_names_the_plugins_that_failed_to_import(
    broken_installed: Path, tmp_path: Path
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("base: some/base\ndata: {train: data.jsonl}\nmethod: {name: ia3}\n")
    result = run_cli("train", str(config), env={"PYTHONPATH": str(broken_installed)})
    assert result.returncode == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "method.name: unknown method 'ia3'; known methods: lora, prefix, qlora" in message
    assert (
        "1 plugin(s) failed to load, so what they register is missing: adapterdeck-broken:broken" in message
    )
    assert "ImportError: this plugin is broken on purpose" in message
    # Without a broken plugin, the message has no such part.
    alone = run_cli("train", str(config), env={"ADAPTERDECK_LOAD_PLUGINS": ""})
    assert "failed to load" not in alone.stderr and "unknown method 'ia3'" in alone.stderr


def test_unknown_names_get_a_did_you_mean(fresh_plugins: None) -> None:
    from adapterdeck.core.config import parse_config
    from adapterdeck.serve.finetune.spec import check_job_config

    cat = catalog()
    with pytest.raises(
        UnknownNameError, match=r"unknown evaluator 'exact_mach' \(did you mean 'exact_match'\?\)"
    ):
        cat.evaluator("exact_mach")
    with pytest.raises(UnknownNameError) as far:
        cat.evaluator("bleu")
    assert "did you mean" not in str(far.value) and "known evaluators: exact_match" in str(far.value)
    config = {"base": "b", "data": {"train": "d.jsonl"}, "eval": {"evaluators": ["loss", "rouge-l"]}}
    with pytest.raises(
        AdapterdeckError, match=r"eval.evaluators.1: unknown evaluator 'rouge-l' \(did you mean 'rouge_l'\?\)"
    ):
        parse_config(config, "run.yaml")
    config = {"base": "b", "data": {"train": "d.jsonl"}, "method": {"name": "lorra"}}
    with pytest.raises(
        AdapterdeckError, match=r"method.name: unknown method 'lorra' \(did you mean 'lora'\?\)"
    ):
        parse_config(config, "run.yaml")
    with pytest.raises(
        AdapterdeckError,
        match=r"adapterdeck.evaluators.0: unknown evaluator 'json-valid' \(did you mean 'json_valid'\?\)",
    ):
        check_job_config(
            base="b", adapter_method={"name": "lora"}, evaluators=["json-valid"], hyperparameters={}
        )
