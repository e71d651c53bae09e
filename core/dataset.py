"""Read a JSONL file of examples, validate every line, and report what is wrong where.

Validation reads the whole file and names every bad line; ``load_examples``
refuses a file with any error, so nothing trains on half-good data.

The file is read as a stream, one line at a time, and a line longer than ``max_line_bytes`` is
skipped over without being held in memory. Whatever a line holds (bytes that are not UTF-8, NUL
bytes, JSON nested deeper than Python can parse, integers too long to convert) becomes that line's
error, never an exception.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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


DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB: far more text than any base's context holds
_READ_CHUNK = 1 << 16


def _read_lines(fh: BinaryIO, max_line_bytes: int, digest: Any) -> Iterator[tuple[int, bytes | None, int]]:
    """Each line's number, its bytes without the newline (None when over the limit) and its length.

    Memory stays within ``max_line_bytes``: an over-long line is read on in chunks, only counted.
    """
    number = 0
    while chunk := fh.readline(max_line_bytes + 1):
        number += 1
        digest.update(chunk)
        if chunk.endswith(b"\n"):
            yield number, chunk[:-1], len(chunk) - 1
            continue
        if len(chunk) <= max_line_bytes:  # the last line, without a newline
            yield number, chunk, len(chunk)
            continue
        length = len(chunk)
        while (rest := fh.readline(_READ_CHUNK)) and not rest.endswith(b"\n"):
            digest.update(rest)
            length += len(rest)
        digest.update(rest)
        length += max(len(rest) - 1, 0)
        yield number, None, length


def _parse_line(number: int, chunk: bytes) -> _Line | None:
    """A line's record, or its error; None for a blank line."""
    if number == 1 and chunk.startswith(b"\xef\xbb\xbf"):
        chunk = chunk[3:]
    if b"\x00" in chunk:
        where = chunk.index(b"\x00") + 1
        return _Line(number, reasons=[f"contains a NUL byte (byte {where}); a JSONL line is UTF-8 text"])
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Line(number, reasons=[f"not valid UTF-8 (byte {exc.start + 1})"])
    if not text.strip():
        return None  # blank lines separate nothing and carry nothing
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return _Line(number, reasons=[f"invalid JSON: {exc.msg} at column {exc.colno}"])
    except RecursionError:
        return _Line(number, reasons=["invalid JSON: nested too deeply"])
    except ValueError as exc:  # an integer with thousands of digits
        return _Line(number, reasons=[f"invalid JSON: {str(exc).split(';')[0]}"])
    if not isinstance(value, dict):
        return _Line(number, reasons=[f"expected a JSON object, got {json_type_name(value)}"])
    return _Line(number, record=value)


def _parse_lines(fh: BinaryIO, max_line_bytes: int, digest: Any) -> tuple[list[_Line], int]:
    lines: list[_Line] = []
    total = 0
    for number, chunk, length in _read_lines(fh, max_line_bytes, digest):
        total = number
        if chunk is None:
            reason = f"the line is {length:,} bytes, over the limit of {max_line_bytes:,} bytes a line"
            lines.append(_Line(number, reasons=[reason]))
            continue
        line = _parse_line(number, chunk)
        if line is not None:
            lines.append(line)
    return lines, total


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
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> ValidationReport:
    """Check every line of a JSONL file; the report lists each bad line and its reasons.

    A line longer than ``max_line_bytes`` (newline excluded) is an error, found without reading it
    into memory.
    """
    path = Path(path)
    if max_line_bytes < 1:
        raise AdapterdeckError(f"max_line_bytes must be a positive number of bytes, got {max_line_bytes}")
    cat = plugins or catalog()
    formats = {name: reg.obj for name, reg in cat.formats.items()}
    if format is not None and format not in formats:
        cat.format(format)  # raises with the list of known formats
    digest = hashlib.sha256()
    try:
        if path.is_dir():
            raise AdapterdeckError(f"cannot read {path}: it is a directory")
        with path.open("rb") as fh:
            lines, total = _parse_lines(fh, max_line_bytes, digest)
    except OSError as exc:
        raise AdapterdeckError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a path with a NUL byte
        raise AdapterdeckError(f"cannot read {path!r}: {exc}") from exc
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
        if conv.rejected is not None:  # the same prompt and answer against another one is another pair
            key += (("rejected", conv.rejected.reference),)
        if key in seen:
            ln.reasons.append(f"duplicate of line {seen[key]}")
            continue
        seen[key] = ln.number
        examples.append((ln, Conversation(conv.messages, ln.number, str(path), conv.meta)))

    report = ValidationReport(str(path), digest.hexdigest(), total, chosen, [], [])
    if token_counter is not None and examples:
        counts = token_counter([c for _, c in examples])
        # A preference pair is trained on both answers: the longer one must fit.
        paired = [(i, c.rejected) for i, (_, c) in enumerate(examples) if c.rejected is not None]
        if paired:
            for (i, _), n in zip(paired, token_counter([r for _, r in paired]), strict=True):
                counts[i] = max(counts[i], n)
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
