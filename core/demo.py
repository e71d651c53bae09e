"""The demo tasks: small, deterministic, and learnable by a tiny random-init model in minutes.

Two tenants, two tasks, so two adapters with visibly different behaviour on one base:

- ``support`` (tenant acme): a customer support message -> ``{"category": ..., "priority": ...}``.
- ``sentiment`` (tenant globex): a product review -> one word, ``positive``, ``negative`` or ``mixed``.

The answer follows from cue words hidden among filler (names, order numbers, products), so a
model has to read the message, and a base model that was never trained answers gibberish.
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
    #: (support with 300: 100% exact match, but 18 points lost on the general probes).
    real_examples: int


TASKS: dict[str, DemoTask] = {
    "support": DemoTask("acme", support_record, ("loss", "exact_match", "json_valid"), real_examples=200),
    "sentiment": DemoTask("globex", sentiment_record, ("loss", "exact_match"), real_examples=300),
}


def write_demo_dataset(path: str | Path, task: str = "support", n: int = 600, seed: int = 0) -> Path:
    """Write ``n`` distinct examples of a demo task as chat JSONL."""
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


# Examples per demo task on the tiny base, which learns from scratch and needs more; on the real
# base each task says how many (``DemoTask.real_examples``), tuned with its method's defaults.
TINY_EXAMPLES = 600


def demo_examples(task: str, real: bool) -> int:
    """How many examples the demo writes for ``task`` on the real or the tiny base."""
    return TASKS[task].real_examples if real else TINY_EXAMPLES


def demo_config(
    base: Path, data: Path, output: Path, seed: int = 0, task: str = "support", real: bool = False
) -> dict[str, Any]:
    """The run config the demo trains a task with.

    On the real base: the LoRA method's defaults, no learning-rate override, the prompted base
    (zero-shot and few-shot) beside the tuned model, and the ``general`` probes for forgetting.
    On the tiny random-init base: a high learning rate and more epochs, since it learns from nothing.
    """
    evaluators = list(TASKS[task].evaluators)
    if real:
        return {
            "base": str(base),
            "data": {"train": str(data)},
            "train": {"seed": seed},
            "eval": {"evaluators": [*evaluators, "general"], "samples": 5, "base_shots": 3},
            "output": str(output),
        }
    return {
        "base": str(base),
        "data": {"train": str(data)},
        "method": {"name": "lora", "r": 8},
        "train": {"learning_rate": 3e-3, "epochs": 6, "batch_size": 16, "seed": seed},
        "eval": {"evaluators": evaluators, "samples": 5},
        "output": str(output),
    }
