"""The plugin guide (docs/plugins.md) stays true to core/hookspecs.py; the example plugin works."""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from adapterdeck.core import evaluators, formats, hookspecs, methods

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
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
        formats.json_type_name,
        methods.MethodParams,
        methods.TuningMethod,
        evaluators.EvalSample,
        evaluators.Evaluator,
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
