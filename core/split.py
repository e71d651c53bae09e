"""Split examples into train, validation and test sets: seeded, deterministic, exact sizes."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.formats import Conversation

DEFAULT_RATIOS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class Split:
    train: list[Conversation]
    validation: list[Conversation]
    test: list[Conversation]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def parse_ratios(text: str) -> tuple[float, float, float]:
    """Parse ``"0.8,0.1,0.1"`` or ``"80/10/10"``."""
    parts = text.replace("/", ",").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise AdapterdeckError(f"split ratios {text!r}: expected three numbers like 0.8,0.1,0.1") from None
    if len(values) != 3:
        raise AdapterdeckError(f"split ratios {text!r}: expected three numbers (train, validation, test)")
    if sum(values) > 1.5:  # percentages
        values = [v / 100 for v in values]
    return values[0], values[1], values[2]


def split_examples(
    examples: Sequence[Conversation],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
) -> Split:
    """Shuffle with ``seed`` and cut by ``ratios`` (train, validation, test; they sum to 1).

    A non-zero ratio always gets at least one example when there are enough, so a small
    file still has something to validate and test on.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise AdapterdeckError(f"split ratios {list(ratios)} must be three non-negative numbers summing to 1")
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = round(n * ratios[1])
    n_test = round(n * ratios[2])
    if n >= 3:
        n_val = max(n_val, 1 if ratios[1] > 0 else 0)
        n_test = max(n_test, 1 if ratios[2] > 0 else 0)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise AdapterdeckError(f"{n} example(s) are too few to split by {list(ratios)}")
    picked = [examples[i] for i in order]
    return Split(picked[:n_train], picked[n_train : n_train + n_val], picked[n_train + n_val :])
