"""Evaluate a model on held-out conversations with evaluator plugins, base and tuned side by side."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from adapterdeck.core.encode import IGNORE, encode, encode_prompt
from adapterdeck.core.evaluators import EvalSample, Evaluator
from adapterdeck.core.formats import Conversation
from adapterdeck.core.loss import answer_only_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from adapterdeck.core.evalcache import BaseOutputCache

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class ModelOutputs:
    """What one model did on the examples: per-example loss and (when needed) generated text."""

    losses: list[float | None]  # None where no evaluator needed the loss
    predictions: list[str | None]
    # log p(preferred answer) - log p(non-preferred answer), summed over each answer's tokens;
    # None where no evaluator needed it or the example is no preference pair.
    margins: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.margins:
            self.margins = [None] * len(self.losses)


@dataclass
class Comparison:
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, ModelOutputs] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)  # base runs read back from a BaseOutputCache


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
    return [
        total / count for total, count in _answer_losses(model, tokenizer, examples, batch_size, progress)
    ]


def preference_margins(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Conversation],
    preferred: Sequence[tuple[float, int]],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[float | None]:
    """For each preference pair, log p(preferred) - log p(non-preferred) of the whole answer
    (the likelihoods DPO compares); None for an example that is no pair. ``preferred`` is
    ``_answer_losses`` of ``examples`` (their preferred answers), computed once for the loss too."""
    pairs = [(i, c.rejected) for i, c in enumerate(examples) if c.rejected is not None]
    out: list[float | None] = [None] * len(examples)
    rejected = _answer_losses(model, tokenizer, [r for _, r in pairs], batch_size, progress, "preference")
    for (i, _), (total, _) in zip(pairs, rejected, strict=True):
        out[i] = total - preferred[i][0]  # losses are negative log-likelihoods
    return out


def _answer_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Conversation],
    batch_size: int,
    progress: Progress | None,
    what: str = "loss",
) -> list[tuple[float, int]]:
    """The summed loss on each example's assistant tokens, and how many tokens it is over."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    only_answers = answer_only_logits(base, model)
    out: list[tuple[float, int]] = []
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
        target = labels[:, 1:]
        kwargs: dict[str, Any] = {}
        if only_answers:  # the vocabulary projection only at positions that predict a reference token
            keep = (target != IGNORE).any(dim=0).nonzero().squeeze(-1)
            kwargs["logits_to_keep"] = keep
            target = target[:, keep]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask.to(device), **kwargs).logits.float()
        shifted = logits if only_answers else logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(target.shape)
        counted = (target != IGNORE).sum(dim=1).clamp(min=1)
        out.extend(zip(loss.sum(dim=1).tolist(), counted.tolist(), strict=True))
        if progress:
            progress(what, start + len(batch), len(examples))
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
    fit_to_references: bool = True,
) -> ModelOutputs:
    """Compute what the evaluators need: losses, and generations if any evaluator needs them.

    With ``fit_to_references``, answers are cut at the longest reference plus a little room
    (a task's answers look like its references); without, at ``max_new_tokens``.
    """
    budget = generation_budget(tokenizer, examples, evaluators, max_new_tokens, fit_to_references)
    needs_loss = any(e.needs_loss for e in evaluators)
    needs_preference = any(e.needs_preference for e in evaluators)
    # One pass over the answers serves both the loss and the preferred side of each pair.
    answers = (
        _answer_losses(model, tokenizer, examples, batch_size, progress)
        if needs_loss or needs_preference
        else []
    )
    losses: list[float | None] = [None] * len(examples)
    if needs_loss:
        losses = [total / count for total, count in answers]
    predictions: list[str | None] = [None] * len(examples)
    if budget:
        predictions = list(generate(model, tokenizer, examples, budget, batch_size, progress))
    margins: list[float | None] = [None] * len(examples)
    if needs_preference:
        margins = preference_margins(model, tokenizer, examples, answers, batch_size, progress)
    return ModelOutputs(losses, predictions, margins)


def generation_budget(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Conversation],
    evaluators: Sequence[Evaluator],
    max_new_tokens: int,
    fit_to_references: bool,
) -> int:
    """New tokens generated per answer: 0 when no evaluator needs text (see ``run_model``)."""
    if not examples or not any(e.needs_generation for e in evaluators):
        return 0
    if not fit_to_references:
        return max_new_tokens
    longest = max(len(tokenizer(c.reference, add_special_tokens=False)["input_ids"]) for c in examples)
    return min(max_new_tokens, longest + 16)


def score(evaluator: Evaluator, examples: Sequence[Conversation], outputs: ModelOutputs) -> dict[str, float]:
    samples = [
        EvalSample(c.prompt, c.reference, prediction=p, loss=loss, meta=c.meta, margin=m)
        for c, p, loss, m in zip(examples, outputs.predictions, outputs.losses, outputs.margins, strict=True)
    ]
    scores = [evaluator.score(s) for s in samples]
    value = evaluator.aggregate(scores)
    return {"value": _clean(value), **{k: _clean(v) for k, v in evaluator.details(scores).items()}}


def _clean(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def pick_shots(pool: Sequence[Conversation], k: int, seed: int = 0) -> list[Conversation]:
    """``k`` examples drawn (seeded) from ``pool`` to show the base in its prompt."""
    if k <= 0 or not pool:
        return []
    rng = random.Random(f"shots-{seed}")
    return rng.sample(list(pool), min(k, len(pool)))


def with_shots(conv: Conversation, shots: Sequence[Conversation]) -> Conversation:
    """``conv`` with the shots' turns (each a solved example) before its own, after its system prompt."""
    if not shots:
        return conv
    system = [m for m in conv.messages[:1] if m.role == "system"]
    shown = [m for shot in shots for m in shot.messages if m.role != "system"]
    rest = list(conv.messages[len(system) :])
    return replace(conv, messages=(*system, *shown, *rest))


# Labels of the models a comparison runs: the base prompted as the data is, the base with k solved
# examples in its prompt, and the tuned model.
BASE, FEW_SHOT, TUNED = "base", "base_few_shot", "tuned"

Run = tuple[str, Callable[[], AbstractContextManager[Any]], Sequence[Conversation]]  # label, context, prompts


def compare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Conversation],
    evaluators: Sequence[Evaluator],
    *,
    base_context: Callable[[], AbstractContextManager[Any]] | None,
    shots: Sequence[Conversation] = (),
    max_new_tokens: int = 128,
    batch_size: int = 32,
    samples: int = 5,
    progress: Progress | None = None,
    base_cache: BaseOutputCache | None = None,
) -> Comparison:
    """Score the tuned model and (inside ``base_context``, which disables the adapter) the base.

    The base is scored as prompted by the data (zero-shot, with the data's system prompt) and,
    when ``shots`` are given, with those solved examples in its prompt (few-shot): the prompt
    baseline tuning has to beat. Evaluators that bring their own probe set (``examples()``) score
    the base and the tuned model on it instead of on ``examples``. With ``base_cache``, the base's
    outputs are read from it where an earlier run stored them, and stored there otherwise;
    ``Comparison.cached`` names the runs read back.
    """
    result = Comparison()
    probe_sets = {ev.name: ev.examples() for ev in evaluators}
    on_task = [ev for ev in evaluators if probe_sets[ev.name] is None]
    runs: list[Run] = []
    if base_context is not None:
        runs.append((BASE, base_context, examples))
        if shots:
            runs.append((FEW_SHOT, base_context, [with_shots(c, shots) for c in examples]))
    runs.append((TUNED, nullcontext, examples))
    runner = _Runner(model, tokenizer, batch_size, progress, base_cache, result.cached)
    model.eval()
    if on_task:
        for label, context, prompts in runs:
            result.outputs[label] = runner.outputs(label, context, prompts, on_task, max_new_tokens, label)
    for ev in evaluators:
        result.metrics[ev.name] = _metric(ev, probe_sets[ev.name], examples, runs, result.outputs, runner)
    for i, conv in enumerate(examples[:samples] if result.outputs else []):
        row: dict[str, Any] = {"line": conv.line, "prompt": conv.prompt, "reference": conv.reference}
        for label, outputs in result.outputs.items():
            row[label] = outputs.predictions[i]
            row[f"{label}_loss"] = _clean(outputs.losses[i])
        result.samples.append(row)
    return result


@dataclass
class _Runner:
    """Runs one comparison's models; the base's outputs come from ``base_cache`` where it has them."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    batch_size: int
    progress: Progress | None
    base_cache: BaseOutputCache | None
    cached: list[str]  # what was read back, in order

    def outputs(
        self,
        label: str,
        context: Callable[[], AbstractContextManager[Any]],
        prompts: Sequence[Conversation],
        evs: Sequence[Evaluator],
        budget: int,
        shown: str,
        fit: bool = True,
    ) -> ModelOutputs:
        cache = self.base_cache if label != TUNED else None
        # The answer budget, worked out once: it is part of the cache key and what run_model uses.
        tokens = generation_budget(self.tokenizer, prompts, evs, budget, fit)
        key = ""
        if cache is not None:
            losses = any(e.needs_loss for e in evs)
            settings: dict[str, Any] = {"new_tokens": tokens, "losses": losses, "batch_size": self.batch_size}
            if any(e.needs_preference for e in evs):
                settings["margins"] = True
            key = cache.key(prompts, **settings)
            stored = cache.get(key, len(prompts))
            if stored is not None:
                self.cached.append(shown)
                if self.progress is not None:
                    self.progress(f"{shown}: read back from the cache", len(prompts), len(prompts))
                return stored
        with context():
            outputs = run_model(
                self.model,
                self.tokenizer,
                prompts,
                evs,
                tokens,
                self.batch_size,
                self._step(shown),
                fit_to_references=False,
            )
        if cache is not None:
            cache.put(key, outputs)
        return outputs

    def _step(self, label: str) -> Progress | None:
        progress = self.progress
        if progress is None:
            return None
        return lambda what, done, total: progress(f"{label} {what}", done, total)


def _metric(
    ev: Evaluator,
    own: Sequence[Conversation] | None,
    examples: Sequence[Conversation],
    runs: Sequence[Run],
    outputs: dict[str, ModelOutputs],
    runner: _Runner,
) -> dict[str, Any]:
    """One evaluator's scores per model, on the task's examples or on its own probe set ``own``."""
    entry: dict[str, Any] = {"higher_is_better": ev.higher_is_better}
    if own is None:
        for label, out in outputs.items():
            entry[label] = score(ev, examples, out)
    else:
        entry["examples"] = len(own)
        for label, context, _ in runs:
            if label == FEW_SHOT:
                continue
            shown = f"{label} {ev.name}"
            out = runner.outputs(label, context, own, [ev], ev.max_new_tokens, shown, fit=False)
            entry[label] = score(ev, own, out)
    if BASE in entry:
        b, t = entry[BASE]["value"], entry[TUNED]["value"]
        entry["delta"] = None if b is None or t is None else round(t - b, 6)
    return entry


def headline(metrics: dict[str, dict[str, Any]], evaluators: Sequence[Evaluator]) -> str | None:
    """The metric a verdict rests on: the first task metric scored on generated answers, higher better."""
    for ev in evaluators:
        if ev.needs_generation and ev.higher_is_better and ev.examples() is None and ev.name in metrics:
            return ev.name
    return None


def prompt_verdict(metrics: dict[str, dict[str, Any]], evaluators: Sequence[Evaluator]) -> str | None:
    """One line on what the prompted base says about tuning this task, from the measured figures.

    The rule of thumb: tuning pays most where a prompted base is already close (90% -> 99%);
    where the prompted base is far off (20%), tuning alone may not fix the task.
    """
    name = headline(metrics, evaluators)
    if name is None:
        return None
    entry = metrics[name]
    prompted = {label: entry[label]["value"] for label in (BASE, FEW_SHOT) if label in entry}
    prompted = {k: v for k, v in prompted.items() if v is not None}
    tuned = entry.get(TUNED, {}).get("value")
    if not prompted or tuned is None:
        return None
    best_label = max(prompted, key=lambda k: prompted[k])
    best = prompted[best_label]
    how = "few-shot" if best_label == FEW_SHOT else "zero-shot"
    head = f"{name}: prompted base {best:.0%} (best of zero-shot and few-shot: {how}), tuned {tuned:.0%}"
    if best >= 0.7:
        gain = (
            "tuning pays here" if tuned > best else "tuning did not beat prompting; prompt the base instead"
        )
        return f"{head}. The prompted base is already close; {gain}."
    if best < 0.3:
        if tuned >= 0.9:
            return (
                f"{head}. The prompted base is far off, where tuning alone often does not fix a task; "
                "here it did on the held-out split: the task is one tuning teaches (a format, a label set)."
            )
        return (
            f"{head}. The prompted base is far off: tuning alone may not fix this task; "
            "check the data, add examples, or use a larger base."
        )
    adds = "adds" if tuned > best else "did not add"
    return f"{head}. The prompted base is part of the way; tuning {adds} to it."
