"""A training run's data: every file validated, the split, ``data.mix`` mixed in, all encoded.

All of it happens before any model loads, so a bad line fails the run in seconds.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterdeck.core.basemodel import context_length, load_tokenizer, token_counter
from adapterdeck.core.config import RunConfig
from adapterdeck.core.dataset import DataError, ValidationReport, validate_file
from adapterdeck.core.encode import EncodedDataset, encode_all
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.formats import Conversation
from adapterdeck.core.objectives import TrainingObjective, data_kind_problem
from adapterdeck.core.plugins import catalog
from adapterdeck.core.progress import Reporter
from adapterdeck.core.split import Split, split_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class RunData:
    """The run's data: validated, split, mixed and encoded."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int
    reports: list[ValidationReport]  # every file read: the training files first
    split: Split
    train: list[Conversation]  # the split's training examples, with any mixed-in ones
    mix: dict[str, Any] | None
    sha256: str  # of all the files' digests
    train_ds: EncodedDataset
    val_ds: EncodedDataset


def load_data(config: RunConfig, rep: Reporter) -> RunData:
    """Validate every data file, split, mix in ``data.mix`` and encode: all before any model loads."""
    tokenizer = load_tokenizer(config.base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_length = config.train.max_length or context_length(config.base) or 2048
    counter = token_counter(tokenizer)

    def validated(paths: list[Path] | None) -> list[ValidationReport] | None:
        if not paths:
            return None
        return _validate_all(paths, config.data.format, counter, max_length, config.data.max_line_bytes)

    train_reports = validated(config.data.train) or []
    val_reports, test_reports = validated(config.data.validation), validated(config.data.test)
    split = _split(
        config,
        _examples(train_reports),
        _examples(val_reports) if val_reports else None,
        _examples(test_reports) if test_reports else None,
    )
    train_examples, mix_info = _mix(config, split.train, counter, max_length)
    if not split.validation:
        raise AdapterdeckError("no validation examples: early stopping and the best checkpoint need some")
    reports = train_reports + (val_reports or []) + (test_reports or [])
    digest = hashlib.sha256("".join(sorted(r.sha256 for r in reports)).encode()).hexdigest()
    train_ds = encode_all(tokenizer, train_examples)
    val_ds = encode_all(tokenizer, split.validation)
    rep.note(
        f"data: train {len(train_examples)}, validation {len(split.validation)}, test {len(split.test)} "
        f"examples; {train_ds.tokens()} training tokens"
    )
    return RunData(tokenizer, max_length, reports, split, train_examples, mix_info, digest, train_ds, val_ds)


def _validate_all(
    paths: list[Path], fmt: str | None, counter: Any, max_tokens: int | None, max_line_bytes: int
) -> list[ValidationReport]:
    reports = [
        validate_file(
            p, format=fmt, token_counter=counter, max_tokens=max_tokens, max_line_bytes=max_line_bytes
        )
        for p in paths
    ]
    bad = [r for r in reports if not r.ok]
    if bad:
        raise AdapterdeckError("\n".join(str(DataError(r)) for r in bad))
    return reports


def _examples(reports: list[ValidationReport]) -> list[Conversation]:
    return [c for r in reports for c in r.examples]


def _split(
    config: RunConfig,
    train: list[Conversation],
    val: list[Conversation] | None,
    test: list[Conversation] | None,
) -> Split:
    r_train, r_val, r_test = config.data.split
    seed = config.train.seed
    if val is not None and test is not None:
        return Split(train, val, test)
    if val is None and test is None:
        return split_examples(train, config.data.split, seed=seed)
    # One of the two is given: split the other one off the training data.
    missing = r_test if val is not None else r_val
    total = r_train + missing
    parts = split_examples(train, (r_train / total, 0.0, missing / total), seed=seed)
    return Split(
        parts.train, val if val is not None else parts.test, test if test is not None else parts.test
    )


def _mix(
    config: RunConfig, train: list[Conversation], counter: Any, max_tokens: int | None
) -> tuple[list[Conversation], dict[str, Any] | None]:
    mix = config.data.mix
    if mix is None:
        return train, None
    (report,) = _validate_all([mix.file], mix.format, counter, max_tokens, config.data.max_line_bytes)
    wanted = round(len(train) * mix.ratio / (1 - mix.ratio))
    rng = random.Random(config.train.seed)
    pool = list(report.examples)
    rng.shuffle(pool)
    taken = pool[:wanted]
    mixed = train + taken
    rng.shuffle(mixed)
    info = {
        "file": str(mix.file),
        "format": report.format,
        "sha256": report.sha256,
        "ratio": mix.ratio,
        "examples": len(taken),
    }
    if len(taken) < wanted:
        info["note"] = f"wanted {wanted} examples at ratio {mix.ratio}, the file has {len(taken)}"
    return mixed, info


def check_data_kinds(objective: TrainingObjective, data: RunData) -> None:
    """Refuse data the objective cannot train on (a chat file for ``dpo``): before any model loads."""
    formats = catalog().formats
    files = [(r.path, r.format) for r in data.reports]
    if data.mix:
        files.append((data.mix["file"], data.mix["format"]))
    problems = [
        f"{path}: {problem}"
        for path, fmt in files
        if (problem := data_kind_problem(objective, fmt, formats[fmt].obj.kind if fmt in formats else None))
    ]
    if problems:
        raise AdapterdeckError("\n".join(problems))
