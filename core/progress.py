"""The losses logged at each training step, as a ``Reporter`` learns them.

``Reporter.train_step(step, loss, val_loss)`` is called when the Trainer ends step ``step``, and
transformers calls ``on_step_end`` before it logs the training loss and evaluates at that step:
``loss`` and ``val_loss`` are the values logged last, at an earlier step. A value first passed at
step S was therefore logged at step S - 1, and what is logged at the last step comes with no
further call: it is read from the run's report when training ends (``StepLosses.finish``).

Both reporters (the CLI's progress bar and a fine-tuning job's events) go through ``StepLosses``,
so they name the same step for each value as the report's ``train_loss`` and ``val_loss`` (and a
job's ``step_metrics.csv``) do.
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
        self._passed: tuple[object, object] = (None, None)

    def reached(self, step: int, loss: float | None, val_loss: float | None) -> list[StepLoss]:
        """Take a ``train_step`` call; returns the step whose values it revealed (none or one)."""
        logged = step - 1
        last_loss, last_val = self._passed
        self._passed = (loss, val_loss)
        # The trainer's callback passes the same float object until the Trainer logs again, so a new
        # value is told apart even from an equal one (training losses are rounded, and repeat).
        new_loss = loss is not None and loss is not last_loss
        new_val = val_loss is not None and val_loss is not last_val
        if new_loss:
            self.train[logged] = float(loss)  # type: ignore[arg-type]
        if new_val:
            self.valid[logged] = float(val_loss)  # type: ignore[arg-type]
        self.known_through = max(self.known_through, logged)
        return [self.at(logged)] if new_loss or new_val else []

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
