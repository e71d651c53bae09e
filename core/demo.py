"""The demo tasks: small, deterministic, and learnable by a tiny random-init model in minutes.

Three tenants, three tasks, so three adapters with visibly different behaviour on one base:

- ``support`` (tenant acme): a customer support message -> ``{"category": ..., "priority": ...}``.
- ``sentiment`` (tenant globex): a product review -> one word, ``positive``, ``negative`` or ``mixed``.
- ``direct`` (tenant initech), preference pairs for DPO: a small counting question, where the
  answer first and then why is preferred over a chatty preamble before the same answer.

In the first two the answer follows from cue words hidden among filler (names, order numbers,
products), so a model has to read the message, and a base model that was never trained answers
gibberish. The third teaches a style, not a fact: both sides of a pair hold the right answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAMES = ["Maria", "John", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Sara", "Ivan", "Nora", "Ben"]
PRODUCTS = [
    "the kettle",
    "my headphones",
    "the desk lamp",
    "the blender",
    "my tablet",
    "the router",
    "the jacket",
]

SUPPORT_SYSTEM = "Classify the support message. Answer with JSON: category and priority."
CATEGORIES = {
    "billing": [
        "I was charged twice for",
        "the invoice is wrong for",
        "I want a refund for",
        "my card was billed for",
    ],
    "shipping": ["the package with", "tracking shows no movement for", "the delivery of", "the courier lost"],
    "account": [
        "I cannot log in to order",
        "my password reset fails for",
        "my account is locked, about",
        "the login page rejects me, about",
    ],
    "technical": [
        "there is an error when using",
        "the app crashes with",
        "a bug stops me using",
        "it keeps failing with",
    ],
}
PRIORITIES = {
    "high": [
        "Please fix this urgently.",
        "I need this solved today!",
        "This is urgent.",
        "Help asap please.",
    ],
    "low": ["No rush at all.", "Whenever you have time.", "It can wait until next week.", "Not urgent."],
    "normal": ["Thanks.", "Let me know.", "Kind regards.", "Thank you for your help."],
}

SENTIMENT_SYSTEM = "Read the review. Answer with one word: positive, negative or mixed."
GOOD = ["works great", "is excellent", "arrived quickly", "is lovely", "is well made", "exceeded my hopes"]
BAD = [
    "broke in a week",
    "is terrible",
    "arrived damaged",
    "is useless",
    "stopped working",
    "disappointed me",
]


def support_record(rng: random.Random) -> dict[str, Any]:
    category = rng.choice(sorted(CATEGORIES))
    priority = rng.choice(sorted(PRIORITIES))
    who = rng.choice(NAMES)
    order = rng.randint(1000, 9999)
    text = (
        f"Hi, this is {who}. {rng.choice(CATEGORIES[category]).capitalize()} "
        f"{rng.choice(PRODUCTS)} (order {order}). {rng.choice(PRIORITIES[priority])}"
    )
    answer = json.dumps({"category": category, "priority": priority})
    return _chat(SUPPORT_SYSTEM, text, answer)


def sentiment_record(rng: random.Random) -> dict[str, Any]:
    label = rng.choice(["positive", "negative", "mixed"])
    product = rng.choice(PRODUCTS).replace("my ", "the ")
    if label == "positive":
        clauses = [f"{product.capitalize()} {rng.choice(GOOD)}", f"and it {rng.choice(GOOD)}"]
    elif label == "negative":
        clauses = [f"{product.capitalize()} {rng.choice(BAD)}", f"and it {rng.choice(BAD)}"]
    else:
        clauses = [f"{product.capitalize()} {rng.choice(GOOD)}", f"but it {rng.choice(BAD)}"]
        if rng.random() < 0.5:
            clauses = [f"{product.capitalize()} {rng.choice(BAD)}", f"but it {rng.choice(GOOD)}"]
    text = f"{' '.join(clauses)}. Bought by {rng.choice(NAMES)} in {rng.randint(2019, 2026)}."
    return _chat(SENTIMENT_SYSTEM, text, label)


# ``direct``: the answer first, then why, preferred over a chatty preamble before the answer.
# Both sides hold the same right answer and are about as long, so what a preference-tuned model
# learns is the style, not a length or a fact.
DIRECT_QUESTIONS: list[tuple[str, Callable[[int, int], int], str]] = [
    (
        "How many minutes are in {a} hours?",
        lambda a, b: a * 60,
        "Each hour has 60 minutes, and {a} × 60 = {x}.",
    ),
    ("How many hours are in {a} days?", lambda a, b: a * 24, "Each day has 24 hours, and {a} × 24 = {x}."),
    ("How many days are in {a} weeks?", lambda a, b: a * 7, "Each week has 7 days, and {a} × 7 = {x}."),
    (
        "How many months are in {a} years?",
        lambda a, b: a * 12,
        "Each year has 12 months, and {a} × 12 = {x}.",
    ),
    ("How many legs do {a} spiders have?", lambda a, b: a * 8, "A spider has 8 legs, and {a} × 8 = {x}."),
    ("How many wheels do {a} cars have?", lambda a, b: a * 4, "A car has 4 wheels, and {a} × 4 = {x}."),
    ("What is {a} plus {b}?", lambda a, b: a + b, "Adding {b} to {a} gives {x}."),
    ("What is {a} times {b}?", lambda a, b: a * b, "{a} groups of {b} make {x}."),
    (
        "I have {a} apples and eat {b} of them. How many are left?",
        lambda a, b: a - b,
        "Taking {b} from {a} leaves {x}.",
    ),
]
PREAMBLES = [
    "Great question! Let me work that out for you. The answer is {x}.",
    "What a fun one to think about! After some thought, I get {x}.",
    "Sure, I would be happy to help you with this. It comes to {x}.",
    "That is an interesting question! Let me see... I believe it is {x}.",
]


def direct_record(rng: random.Random) -> dict[str, Any]:
    question, answer, why = rng.choice(DIRECT_QUESTIONS)
    a = rng.randint(2, 19)
    b = rng.randint(1, a - 1)
    x = answer(a, b)
    return {
        "input": {"messages": [{"role": "user", "content": question.format(a=a, b=b)}]},
        "preferred_output": [{"role": "assistant", "content": f"{x}. " + why.format(a=a, b=b, x=x)}],
        "non_preferred_output": [{"role": "assistant", "content": rng.choice(PREAMBLES).format(x=x)}],
    }


def _chat(system: str, user: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


@dataclass(frozen=True)
class DemoTask:
    tenant: str
    make: Callable[[random.Random], dict[str, Any]]
    evaluators: tuple[str, ...]
    #: Examples the demo writes on the real base: enough for >= 95% exact match with the LoRA
    #: method's defaults (measured: support 95% with 200, sentiment 85% with 200 and 100% with
    #: 300), and no more, since more steps on one narrow format make the base forget more
    #: (support with 300: 100% exact match, but 18 points lost on the general probes). None: the
    #: task runs on the tiny base only (``direct``: on the real base the pairs are already ranked
    #: right, preference accuracy 100% before tuning, and its answers need sums it cannot do:
    #: measured, 20 DPO steps took first_word from 0% to 5% only).
    real_examples: int | None
    #: The training objective (``sft``, or ``dpo`` for a task of preference pairs).
    objective: str = "sft"
    #: The metric that says whether the task was learned (shown first by the demo).
    headline: str = "exact_match"
    #: Examples on the tiny base.
    tiny_examples: int = 600


TASKS: dict[str, DemoTask] = {
    "support": DemoTask("acme", support_record, ("loss", "exact_match", "json_valid"), real_examples=200),
    "sentiment": DemoTask("globex", sentiment_record, ("loss", "exact_match"), real_examples=300),
    "direct": DemoTask(
        "initech", direct_record, ("loss", "first_word"), real_examples=None, objective="dpo",
        headline="preference_accuracy", tiny_examples=200,
    ),
}  # fmt: skip


def write_demo_dataset(path: str | Path, task: str = "support", n: int = 600, seed: int = 0) -> Path:
    """Write ``n`` distinct examples of a demo task as JSONL (chat; preference pairs for ``direct``)."""
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; tasks: {', '.join(TASKS)}")
    make = TASKS[task].make
    rng = random.Random(f"{task}-{seed}")
    seen: set[str] = set()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        while len(seen) < n:
            line = json.dumps(make(rng))
            if line not in seen:
                seen.add(line)
                fh.write(line + "\n")
    return path


def demo_examples(task: str, real: bool) -> int | None:
    """How many examples the demo writes for ``task`` on the real or the tiny base (which learns
    from scratch and needs more; on the real base each task is tuned with its method's defaults);
    None: the task does not run on that base."""
    spec = TASKS[task]
    return spec.real_examples if real else spec.tiny_examples


def demo_config(
    base: Path, data: Path, output: Path, seed: int = 0, task: str = "support", real: bool = False
) -> dict[str, Any]:
    """The run config the demo trains a task with.

    On the real base: the LoRA method's defaults, no learning-rate override, the prompted base
    (zero-shot and few-shot) beside the tuned model, and the ``general`` probes for forgetting.
    On the tiny random-init base: a high learning rate and more epochs, since it learns from nothing.
    """
    spec = TASKS[task]
    evaluators = list(spec.evaluators)
    objective = {"objective": spec.objective} if spec.objective != "sft" else {}
    if real:
        return {
            "base": str(base),
            "data": {"train": str(data)},
            **objective,
            "train": {"seed": seed},
            "eval": {"evaluators": [*evaluators, "general"], "samples": 5, "base_shots": 3},
            "output": str(output),
        }
    return {
        "base": str(base),
        "data": {"train": str(data)},
        "method": {"name": "lora", "r": 8},
        **objective,
        "train": {"learning_rate": 3e-3, "epochs": 2 if objective else 6, "batch_size": 16, "seed": seed},
        "eval": {"evaluators": evaluators, "samples": 5},
        "output": str(output),
    }
