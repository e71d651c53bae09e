"""The demo tasks: small, deterministic, and learnable by a tiny random-init model in minutes.

Three tenants, three tasks, so three adapters with visibly different behaviour on one base:

- ``support`` (tenant acme): a customer support message -> ``{"category": ..., "priority": ...}``.
- ``sentiment`` (tenant globex): a product review -> one word, ``positive``, ``negative`` or ``mixed``.
- ``direct`` (tenant initech), preference pairs for DPO: a question of common knowledge, where a
  one-line answer first ("TL;DR: Paris.") and then why is preferred over the why alone.

In the first two the answer follows from cue words hidden among filler (names, order numbers,
products), so a model has to read the message, and a base model that was never trained answers
gibberish. The third teaches a style, not a fact: both sides of a pair hold the right answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
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


# ``direct``: a one-line answer first ("TL;DR: Paris."), then the sentence that explains it, preferred
# over the explaining sentence alone. Both sides hold the same right answer; the preferred side is
# the longer one, so a base model that ranks answers by their likelihood ranks these pairs wrong,
# and what a preference-tuned model learns is the house style, not a fact. The facts are ones a
# small pretrained model knows, so its tuned answers can be right as well as direct.
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "the United Kingdom": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo",
    "Canada": "Ottawa", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Norway": "Oslo", "Sweden": "Stockholm", "Austria": "Vienna", "Poland": "Warsaw",
    "Kenya": "Nairobi", "Peru": "Lima", "Argentina": "Buenos Aires", "Thailand": "Bangkok",
    "India": "New Delhi", "Turkey": "Ankara", "Cuba": "Havana", "Australia": "Canberra",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "happy": "sad",
    "open": "closed", "early": "late", "wet": "dry", "full": "empty", "loud": "quiet",
    "hard": "soft", "strong": "weak", "rich": "poor", "thick": "thin",
}  # fmt: skip
COLOURS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "a ripe banana": "yellow",
    "coal": "black", "a ripe tomato": "red", "a carrot": "orange", "a lemon": "yellow",
    "milk": "white", "a lime": "green",
}  # fmt: skip
LEGS = {"cat": 4, "dog": 4, "spider": 8, "bird": 2, "ant": 6, "horse": 4, "chicken": 2, "cow": 4}
NUMBER_WORDS = {2: "two", 4: "four", 6: "six", 8: "eight"}
OPENERS = ["", "Quick question: ", "Hi! ", "Please tell me: "]


# Each family of facts: its table, the questions asked of an entry (``{k}``: the key as asked),
# how the key is put in a question, the one-word answer and the sentence that explains it.
Entry = Callable[[str, Any], str]
FACT_FAMILIES: list[tuple[dict[str, Any], list[str], Callable[[str], str], Entry, Entry]] = [
    (
        CAPITALS,
        ["What is the capital of {k}?", "Which city is the capital of {k}?", "Name the capital of {k}."],
        str,
        lambda country, city: city,
        lambda country, city: f"{city} is the capital city of {country}, where its government sits.",
    ),
    (
        OPPOSITES,
        [
            "What is the opposite of {k}?",
            "Which word means the opposite of {k}?",
            "Give the opposite of {k}.",
        ],
        lambda word: f'"{word}"',
        lambda word, other: other.capitalize(),
        lambda word, other: f'The word "{other}" means the reverse of "{word}".',
    ),
    (
        COLOURS,
        ["What colour is {k}?", "Which colour is {k}?", "What is the colour of {k}?"],
        str,
        lambda thing, colour: colour.capitalize(),
        lambda thing, colour: f"{thing[0].upper()}{thing[1:]} is {colour}, as most people see it.",
    ),
    (
        LEGS,
        ["How many legs does a {k} have?", "How many legs has a {k} got?", "Count the legs of a {k}."],
        str,
        lambda animal, n: str(n),
        lambda animal, n: f"A {animal} walks on {NUMBER_WORDS[n]} legs.",
    ),
]  # fmt: skip


def _fact(rng: random.Random) -> tuple[str, str, str]:
    """A question, its one-word or one-name answer, and a sentence that explains it."""
    table, questions, asked, answer, why = rng.choice(FACT_FAMILIES)
    key = rng.choice(sorted(table))
    value = table[key]
    return rng.choice(questions).format(k=asked(key)), answer(key, value), why(key, value)


def direct_record(rng: random.Random) -> dict[str, Any]:
    question, answer, why = _fact(rng)
    return {
        "input": {"messages": [{"role": "user", "content": rng.choice(OPENERS) + question}]},
        "preferred_output": [{"role": "assistant", "content": f"TL;DR: {answer}.\n\n{why}"}],
        "non_preferred_output": [{"role": "assistant", "content": why}],
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
    #: task runs on the tiny base only.
    real_examples: int | None
    #: The training objective as run.yaml's ``objective`` takes it: ``sft``, or ``dpo`` (with
    #: its parameters) for a task of preference pairs.
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "sft"})
    #: The metric that says whether the task was learned (shown first by the demo).
    headline: str = "exact_match"
    #: Examples on the tiny base.
    tiny_examples: int = 600
    #: Epochs on the real base (the config's default when None).
    real_epochs: int | None = None

    @property
    def objective_name(self) -> str:
        return str(self.objective["name"])


#: ``direct`` on the real base (300 pairs, one epoch: 30 steps), measured: plain DPO took held-out
#: preference accuracy from 0% to 100% and TL;DR-first answers from 0% to 70%, but the answer in the
#: TL;DR line got worse ("TL;DR: Up." for the opposite of up); with the supervised term on the
#: preferred side (``sft_weight`` 1.0) TL;DR-first went to 100% and the right one-line answer to
#: 63% (3-shot prompting: 53%). On the tiny base the term is needed for the pairs to be learned at
#: all (200 pairs: plain DPO 0.25-0.7 preference accuracy, with the term 0.8).
DIRECT_OBJECTIVE = {"name": "dpo", "sft_weight": 1.0}

TASKS: dict[str, DemoTask] = {
    "support": DemoTask("acme", support_record, ("loss", "exact_match", "json_valid"), real_examples=200),
    "sentiment": DemoTask("globex", sentiment_record, ("loss", "exact_match"), real_examples=300),
    "direct": DemoTask(
        "initech", direct_record, ("loss", "first_word", "first_line"), real_examples=300,
        objective=DIRECT_OBJECTIVE, headline="preference_accuracy", tiny_examples=200, real_epochs=1,
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
        misses = 0
        while len(seen) < n:
            line = json.dumps(make(rng))
            if line in seen:
                misses += 1
                if misses > 100 * n:
                    raise ValueError(f"demo task {task!r} has fewer than {n} distinct examples")
                continue
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
    sft = spec.objective_name == "sft"
    objective = {} if sft else {"objective": dict(spec.objective)}
    if real:
        train: dict[str, Any] = {"seed": seed}
        if spec.real_epochs is not None:
            train["epochs"] = spec.real_epochs
        return {
            "base": str(base),
            "data": {"train": str(data)},
            **objective,
            "train": train,
            "eval": {"evaluators": [*evaluators, "general"], "samples": 5, "base_shots": 3},
            "output": str(output),
        }
    return {
        "base": str(base),
        "data": {"train": str(data)},
        "method": {"name": "lora", "r": 8},
        **objective,
        "train": {
            "learning_rate": 3e-3 if sft else 1e-2,
            "epochs": 6 if sft else 4,
            "batch_size": 16,
            "seed": seed,
        },
        "eval": {"evaluators": evaluators, "samples": 5},
        "output": str(output),
    }
