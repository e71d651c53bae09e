"""Read a JSONL file of examples, validate every line, and report what is wrong where.

Validation reads the whole file and names every bad line; ``load_examples``
refuses a file with any error, so nothing trains on half-good data.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.formats import Conversation, DataFormat, json_type_name
from adapterdeck.core.plugins import Catalog, catalog

# Renders a conversation to token ids under a base model's tokenizer and chat template.
TokenCounter = Callable[[Sequence[Conversation]], list[int]]


@dataclass(frozen=True)
class LineError:
    line: int
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return where + "; ".join(self.reasons)


@dataclass(frozen=True)
class Spread:
    min: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        return cls(min(values), round(statistics.fmean(values), 2), max(values))


@dataclass
class ValidationReport:
    path: str
    sha256: str
    lines: int
    format: str | None
    examples: list[Conversation]
    errors: list[LineError]
    tokens: Spread | None = None
    max_tokens: int | None = None
    turns: Spread | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "format": self.format,
            "sha256": self.sha256,
            "lines": self.lines,
            "examples": len(self.examples),
            "errors": [{"line": e.line, "reasons": list(e.reasons)} for e in self.errors],
            "stats": {
                "examples": len(self.examples),
                "turns": vars(self.turns) if self.turns else None,
                "tokens": vars(self.tokens) if self.tokens else None,
                "max_tokens": self.max_tokens,
            },
            "notes": self.notes,
        }


class DataError(AdapterdeckError):
    """A data file has errors; ``report`` names every bad line."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        shown = "\n".join(f"  {e}" for e in report.errors[:50])
        more = len(report.errors) - 50
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{report.path}: {len(report.errors)} bad line(s); nothing was trained:\n{shown}{tail}"
        )


@dataclass
class _Line:
    number: int
    record: dict[str, Any] | None = None
    format: DataFormat | None = None
    reasons: list[str] = field(default_factory=list)


def _parse_lines(raw: bytes) -> tuple[list[_Line], int]:
    lines: list[_Line] = []
    text_lines = raw.split(b"\n")
    if raw.endswith(b"\n"):
        text_lines.pop()
    for number, chunk in enumerate(text_lines, start=1):
        if number == 1 and chunk.startswith(b"\xef\xbb\xbf"):
            chunk = chunk[3:]
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            lines.append(_Line(number, reasons=[f"not valid UTF-8 (byte {exc.start + 1})"]))
            continue
        if not text.strip():
            continue  # blank lines separate nothing and carry nothing
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            lines.append(_Line(number, reasons=[f"invalid JSON: {exc.msg} at column {exc.colno}"]))
            continue
        if not isinstance(value, dict):
            lines.append(_Line(number, reasons=[f"expected a JSON object, got {json_type_name(value)}"]))
            continue
        lines.append(_Line(number, record=value))
    return lines, len(text_lines)


def _assign_formats(lines: list[_Line], formats: dict[str, DataFormat], forced: str | None) -> str | None:
    records = [ln for ln in lines if ln.record is not None]
    if forced is not None:
        for ln in records:
            ln.format = formats[forced]
        return forced
    described = "; ".join(f"{f.name}: {f.description}" for f in formats.values())
    for ln in records:
        assert ln.record is not None
        hits = [f for f in formats.values() if f.detect(ln.record)]
        if not hits:
            ln.reasons.append(f"not a record of any known format ({described})")
        elif len(hits) > 1:
            names = " and ".join(f.name for f in hits)
            ln.reasons.append(f"ambiguous: looks like {names}; pass --format")
        else:
            ln.format = hits[0]
    counts = Counter(ln.format.name for ln in records if ln.format is not None)
    if not counts:
        return None
    # The file's format is the one most lines use (the first seen on a tie).
    first_seen = [ln.format.name for ln in records if ln.format is not None]
    chosen = max(counts, key=lambda n: (counts[n], -first_seen.index(n)))
    if len(counts) > 1:
        for ln in records:
            if ln.format is not None and ln.format.name != chosen:
                ln.reasons.append(
                    f"this line is {ln.format.name}, but the file is {chosen} "
                    f"({counts[chosen]} lines); a file must use one format"
                )
                ln.format = None
    return chosen


def validate_file(
    path: str | Path,
    *,
    format: str | None = None,
    token_counter: TokenCounter | None = None,
    max_tokens: int | None = None,
    plugins: Catalog | None = None,
) -> ValidationReport:
    """Check every line of a JSONL file; the report lists each bad line and its reasons."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AdapterdeckError(f"cannot read {path}: {exc.strerror or exc}") from exc
    cat = plugins or catalog()
    formats = {name: reg.obj for name, reg in cat.formats.items()}
    if format is not None and format not in formats:
        cat.format(format)  # raises with the list of known formats
    lines, total = _parse_lines(raw)
    chosen = _assign_formats(lines, formats, format)

    examples: list[tuple[_Line, Conversation]] = []
    seen: dict[tuple[tuple[str, str], ...], int] = {}
    for ln in lines:
        if ln.record is None or ln.format is None:
            continue
        problems = ln.format.problems(ln.record)
        if problems:
            ln.reasons.extend(problems)
            continue
        conv = ln.format.to_conversation(ln.record)
        key = tuple((m.role, m.content) for m in conv.messages)
        if key in seen:
            ln.reasons.append(f"duplicate of line {seen[key]}")
            continue
        seen[key] = ln.number
        examples.append((ln, Conversation(conv.messages, ln.number, str(path), conv.meta)))

    report = ValidationReport(str(path), hashlib.sha256(raw).hexdigest(), total, chosen, [], [])
    if token_counter is not None and examples:
        counts = token_counter([c for _, c in examples])
        report.tokens, report.max_tokens = Spread.of(counts), max_tokens
        kept = []
        for (ln, conv), n in zip(examples, counts, strict=True):
            if max_tokens is not None and n > max_tokens:
                ln.reasons.append(
                    f"{n} tokens under the base's chat template, over the limit of {max_tokens}"
                )
            else:
                kept.append((ln, conv))
        examples = kept
    elif token_counter is None:
        report.notes.append("token counts and the length limit need a base model's tokenizer (--base)")

    report.examples = [c for _, c in examples]
    report.turns = Spread.of([len(c.messages) for c in report.examples])
    report.errors = [LineError(ln.number, tuple(ln.reasons)) for ln in lines if ln.reasons]
    if not lines:
        report.errors.append(LineError(0, ("the file has no examples",)))
    return report


def load_examples(path: str | Path, **kwargs: Any) -> ValidationReport:
    """Validate a file and return its report, or raise ``DataError`` naming every bad line."""
    report = validate_file(path, **kwargs)
    if not report.ok:
        raise DataError(report)
    return report
