"""Data formats, validation (every bad line by number) and splitting."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adapterdeck.core.basemodel import load_tokenizer, token_counter
from adapterdeck.core.dataset import DataError, load_examples, validate_file
from adapterdeck.core.errors import AdapterdeckError, UnknownNameError
from adapterdeck.core.split import parse_ratios, split_examples

from .conftest import run_cli


def chat(user: str, answer: str, system: str | None = None) -> dict:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system:
        msgs.insert(0, {"role": "system", "content": system})
    return {"messages": msgs}


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = [chat(f"question {i}", f"answer {i}") for i in range(6)]

# line number -> (record or raw text, a fragment the reason must contain)
BAD = {
    2: ('{"messages": [', "invalid JSON"),
    4: (
        {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        "unknown role",
    ),
    6: ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    8: (
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        "must be from the assistant",
    ),
    9: (
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
        "empty content",
    ),
    11: (
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},
        "must be a string",
    ),
    12: ({"messages": "hello"}, "must be an array"),
    13: (chat("question 0", "answer 0"), "duplicate of line 1"),
    14: ("[1, 2]", "expected a JSON object"),
}


def mixed_file(tmp_path: Path) -> Path:
    lines: list[object] = []
    good = iter(GOOD)
    for number in range(1, 15):
        lines.append(BAD[number][0] if number in BAD else next(good))
    return write_lines(tmp_path / "mixed.jsonl", lines)


def test_every_bad_line_is_named_with_its_reason(tmp_path: Path) -> None:
    report = validate_file(mixed_file(tmp_path))
    assert report.format == "chat"
    assert [e.line for e in report.errors] == sorted(BAD)
    for error in report.errors:
        assert BAD[error.line][1] in " ".join(error.reasons), error
    assert len(report.examples) == 14 - len(BAD)
    assert not report.ok


def test_cli_validate_names_bad_lines_and_exits_1(tmp_path: Path) -> None:
    result = run_cli("data", "validate", str(mixed_file(tmp_path)), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert [e["line"] for e in report["errors"]] == sorted(BAD)
    assert all(e["reasons"] for e in report["errors"])

    text = run_cli("data", "validate", str(mixed_file(tmp_path)))
    assert text.returncode == 1
    for number in BAD:
        assert f"line {number}:" in text.stdout


def test_cli_validate_clean_file_exits_0_with_stats(tmp_path: Path, base_model: Path) -> None:
    path = write_lines(tmp_path / "clean.jsonl", [*GOOD, chat("q", "a", system="be brief")])
    result = run_cli("data", "validate", str(path), "--base", str(base_model), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["errors"] == []
    stats = report["stats"]
    assert stats["examples"] == 7
    assert stats["turns"] == {"min": 2, "mean": 2.14, "max": 3}
    assert 0 < stats["tokens"]["min"] <= stats["tokens"]["mean"] <= stats["tokens"]["max"]
    assert stats["max_tokens"] == 1024  # the base's context length

    text = run_cli("data", "validate", str(path), "--base", str(base_model))
    assert text.returncode == 0
    assert "examples 7" in text.stdout and "tokens min" in text.stdout and "turns min 2" in text.stdout


def test_token_limit_under_the_chat_template(tmp_path: Path, base_model: Path) -> None:
    path = write_lines(tmp_path / "long.jsonl", [chat("short", "ok"), chat("long " * 300, "ok")])
    counter = token_counter(load_tokenizer(str(base_model)))
    report = validate_file(path, token_counter=counter, max_tokens=100)
    assert [e.line for e in report.errors] == [2]
    assert "over the limit of 100" in report.errors[0].reasons[0]
    # The count includes the template's scaffolding, not only the message text.
    tokenizer = load_tokenizer(str(base_model))
    bare = len(tokenizer("short", add_special_tokens=False)["input_ids"]) + 1
    assert report.tokens is not None and report.tokens.min > bare


def test_alpaca_is_detected_and_converted(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi", "output": "hi", "system": "You are terse."},
            {"instruction": "Broken", "output": 5},
            {"instruction": "", "output": "x"},
        ],
    )
    report = validate_file(path)
    assert report.format == "alpaca"
    assert [(e.line, e.reasons) for e in report.errors] == [
        (3, ("'output' must be a string, got number",)),
        (4, ("empty 'instruction'",)),
    ]
    first, second = report.examples
    assert first.as_dicts() == [
        {"role": "user", "content": "Add the numbers\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert [m.role for m in second.messages] == ["system", "user", "assistant"]
    assert first.line == 1 and second.line == 2


def test_a_file_mixing_formats_is_an_error(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "both.jsonl",
        [GOOD[0], {"instruction": "a", "output": "b"}, GOOD[1], {"instruction": "c", "output": "d"}, GOOD[2]],
    )
    report = validate_file(path)
    assert report.format == "chat"
    assert [e.line for e in report.errors] == [2, 4]
    assert all("a file must use one format" in e.reasons[0] for e in report.errors)


def test_unrecognised_record_and_forced_format(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "odd.jsonl", [GOOD[0], {"text": "plain"}])
    report = validate_file(path)
    assert [e.line for e in report.errors] == [2]
    assert "not a record of any known format" in report.errors[0].reasons[0]

    forced = validate_file(path, format="alpaca")
    assert [e.line for e in forced.errors] == [1, 2]
    assert "missing 'instruction'" in forced.errors[0].reasons

    with pytest.raises(UnknownNameError, match="known formats: alpaca, chat"):
        validate_file(path, format="csv")


def test_blank_lines_bom_and_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "enc.jsonl"
    good = json.dumps(GOOD[0]).encode()
    path.write_bytes(
        b"\xef\xbb\xbf" + good + b"\n\n" + b'{"messages": "\xff"}\n' + json.dumps(GOOD[1]).encode()
    )
    report = validate_file(path)
    assert [e.line for e in report.errors] == [3]
    assert "not valid UTF-8" in report.errors[0].reasons[0]
    assert [c.line for c in report.examples] == [1, 4]


def test_empty_file_and_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert not validate_file(empty).ok
    with pytest.raises(AdapterdeckError, match="cannot read"):
        validate_file(tmp_path / "nope.jsonl")
    result = run_cli("data", "validate", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_load_examples_refuses_a_file_with_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_examples(mixed_file(tmp_path))
    message = str(info.value)
    assert "nothing was trained" in message
    for number in BAD:
        assert f"line {number}:" in message


def test_split_is_seeded_exact_and_disjoint(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "many.jsonl", [chat(f"q{i}", f"a{i}") for i in range(101)])
    examples = load_examples(path).examples
    a = split_examples(examples, (0.8, 0.1, 0.1), seed=3)
    b = split_examples(examples, (0.8, 0.1, 0.1), seed=3)
    c = split_examples(examples, (0.8, 0.1, 0.1), seed=4)
    assert a == b and a != c
    assert a.sizes() == {"train": 81, "validation": 10, "test": 10}
    lines = [{x.line for x in part} for part in (a.train, a.validation, a.test)]
    assert not (lines[0] & lines[1] or lines[0] & lines[2] or lines[1] & lines[2])
    assert set().union(*lines) == set(range(1, 102))

    tiny = split_examples(examples[:3], (0.8, 0.1, 0.1))
    assert tiny.sizes() == {"train": 1, "validation": 1, "test": 1}
    too_few = "2 example(s) are too few to split by [0.0, 0.5, 0.5]"
    with pytest.raises(AdapterdeckError, match=re.escape(too_few)):
        split_examples(examples[:2], (0.0, 0.5, 0.5))
    with pytest.raises(
        AdapterdeckError,
        match=re.escape("split ratios [0.5, 0.2, 0.2] must be three non-negative numbers summing to 1"),
    ):
        split_examples(examples, (0.5, 0.2, 0.2))
    assert parse_ratios("80/10/10") == (0.8, 0.1, 0.1)


def test_cli_split_writes_three_chat_files(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "many.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    )
    result = run_cli("data", "split", str(path), "--out", str(tmp_path / "parts"), "--seed", "1")
    assert result.returncode == 0, result.stderr
    sizes = {}
    for name in ("train", "validation", "test"):
        report = validate_file(tmp_path / "parts" / f"{name}.jsonl")
        assert report.ok and report.format == "chat"
        sizes[name] = len(report.examples)
    assert sizes == {"train": 16, "validation": 2, "test": 2}
    refused = run_cli("data", "split", str(mixed_file(tmp_path)), "--out", str(tmp_path / "no"))
    assert refused.returncode == 2 and "line 2:" in refused.stderr
    assert not (tmp_path / "no").exists()
