"""The losses logged at each training step, as a ``Reporter`` learns them.

``Reporter.train_step(step, loss, val_loss)`` is called once per step, after the Trainer has
logged and validated at that step, with the values logged at it (None where nothing was).
``StepLosses`` keeps them by step, so both reporters (the CLI's progress bar and a fine-tuning
job's events) can tell the latest value at any step and when an epoch's values are all known;
they name the same step for each value as the report's ``train_loss`` and ``val_loss`` (and a
job's ``step_metrics.csv``) do. ``finish`` adds anything the report has that no call brought.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepLoss:
    """What was logged at one step: the training loss, the validation loss, or both."""

    step: int
    train_loss: float | None
    valid_loss: float | None


class StepLosses:
    """Every loss logged so far, by the step it was logged at."""

    def __init__(self) -> None:
        self.train: dict[int, float] = {}
        self.valid: dict[int, float] = {}
        #: Every value logged at a step up to this one is known.
        self.known_through = 0

    def reached(self, step: int, loss: float | None, val_loss: float | None) -> list[StepLoss]:
        """Take a ``train_step`` call; returns the step if it logged anything (none or one)."""
        if loss is not None:
            self.train[step] = float(loss)
        if val_loss is not None:
            self.valid[step] = float(val_loss)
        self.known_through = max(self.known_through, step)
        return [self.at(step)] if loss is not None or val_loss is not None else []

    def finish(self, training: Mapping[str, Any]) -> list[StepLoss]:
        """Take the report's ``training`` section at the end; returns the steps not revealed before
        (the last step's, which no call follows), in order."""
        new: set[int] = set()
        for key, table in (("train_loss", self.train), ("val_loss", self.valid)):
            for point in training.get(key) or []:
                if point["step"] not in table:
                    table[point["step"]] = float(point["loss"])
                    new.add(point["step"])
        self.known_through = max(self.known_through, int(training.get("steps") or 0), *new, 0)
        return [self.at(step) for step in sorted(new)]

    def at(self, step: int) -> StepLoss:
        """What was logged at ``step`` exactly."""
        return StepLoss(step, self.train.get(step), self.valid.get(step))

    def latest(self, step: int) -> tuple[float | None, float | None]:
        """The training and validation losses logged last at or before ``step``."""

        def last(table: dict[int, float]) -> float | None:
            steps = [s for s in table if s <= step]
            return table[max(steps)] if steps else None

        return last(self.train), last(self.valid)


def epoch_ends(total_steps: int, epochs: float) -> list[int]:
    """The step that ends each epoch of a run of ``total_steps`` over ``epochs`` epochs."""
    count = math.ceil(epochs) if epochs else 0
    if not count or not total_steps:
        return []
    per_epoch = total_steps / epochs
    return [min(total_steps, math.ceil(e * per_epoch - 1e-9)) for e in range(1, count + 1)]
