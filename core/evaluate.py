"""Evaluate a model on held-out conversations with evaluator plugins, base and tuned side by side."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapterdeck.core.encode import IGNORE, encode, encode_prompt
from adapterdeck.core.evaluators import EvalSample, Evaluator
from adapterdeck.core.formats import Conversation

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class ModelOutputs:
    """What one model did on the examples: per-example loss and (when needed) generated text."""

    losses: list[float]
    predictions: list[str | None]


@dataclass
class Comparison:
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, ModelOutputs] = field(default_factory=dict)


def _batches(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def example_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Conversation],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[float]:
    """Mean loss on each example's assistant tokens."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out: list[float] = []
    for start, batch in _batches(examples, batch_size):
        rows = [encode(tokenizer, c) for c in batch]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor(
            [r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows], device=device
        )
        labels = torch.tensor(
            [r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows], device=device
        )
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask.to(device)).logits.float()
        shifted, target = logits[:, :-1], labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(target.shape)
        counted = (target != IGNORE).sum(dim=1).clamp(min=1)
        out.extend((loss.sum(dim=1) / counted).tolist())
        if progress:
            progress("loss", start + len(batch), len(examples))
    return out


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Conversation],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy answers to each example's prompt, batched with left padding."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[str] = []
    for start, batch in _batches(examples, batch_size):
        prompts = [encode_prompt(tokenizer, c) for c in batch]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row in out[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        if progress:
            progress("generate", start + len(batch), len(examples))
    return answers


def run_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Conversation],
    evaluators: Sequence[Evaluator],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> ModelOutputs:
    """Compute what the evaluators need: losses, and generations if any evaluator needs them."""
    losses = example_losses(model, tokenizer, examples, batch_size, progress)
    predictions: list[str | None] = [None] * len(examples)
    if any(e.needs_generation for e in evaluators):
        # Answers need not be longer than the longest reference plus a little room.
        longest = max(len(tokenizer(c.reference, add_special_tokens=False)["input_ids"]) for c in examples)
        budget = min(max_new_tokens, longest + 16)
        predictions = list(generate(model, tokenizer, examples, budget, batch_size, progress))
    return ModelOutputs(losses, predictions)


def score(evaluator: Evaluator, examples: Sequence[Conversation], outputs: ModelOutputs) -> dict[str, float]:
    samples = [
        EvalSample(c.prompt, c.reference, prediction=p, loss=loss)
        for c, p, loss in zip(examples, outputs.predictions, outputs.losses, strict=True)
    ]
    scores = [evaluator.score(s) for s in samples]
    value = evaluator.aggregate(scores)
    return {"value": _clean(value), **{k: _clean(v) for k, v in evaluator.details(scores).items()}}


def _clean(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def compare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Conversation],
    evaluators: Sequence[Evaluator],
    *,
    base_context: Callable[[], AbstractContextManager[Any]] | None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    samples: int = 5,
    progress: Progress | None = None,
) -> Comparison:
    """Score the tuned model and (inside ``base_context``, which disables the adapter) the base."""
    result = Comparison()
    runs: list[tuple[str, Callable[[], AbstractContextManager[Any]]]] = [("tuned", nullcontext)]
    if base_context is not None:
        runs.insert(0, ("base", base_context))
    model.eval()
    for label, context in runs:
        with context():
            step = (
                (lambda what, done, total, _l=label: progress(f"{_l} {what}", done, total))
                if progress
                else None
            )
            result.outputs[label] = run_model(
                model, tokenizer, examples, evaluators, max_new_tokens, batch_size, step
            )
    for ev in evaluators:
        entry: dict[str, Any] = {"higher_is_better": ev.higher_is_better}
        for label, outputs in result.outputs.items():
            entry[label] = score(ev, examples, outputs)
        if "base" in entry:
            b, t = entry["base"]["value"], entry["tuned"]["value"]
            entry["delta"] = None if b is None or t is None else round(t - b, 6)
        result.metrics[ev.name] = entry
    for i, conv in enumerate(examples[:samples]):
        row: dict[str, Any] = {"line": conv.line, "prompt": conv.prompt, "reference": conv.reference}
        for label, outputs in result.outputs.items():
            row[label] = outputs.predictions[i]
            row[f"{label}_loss"] = _clean(outputs.losses[i])
        result.samples.append(row)
    return result
