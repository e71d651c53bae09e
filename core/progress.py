"""What a training run tells as it goes: the ``Reporter``, and the losses logged at each step.

``Reporter.train_step(step, loss, val_loss, accuracy=, val_accuracy=)`` is called once per step,
after the Trainer has logged and validated at that step, with the values logged at it (None where
nothing was): the losses and the mean token accuracies logged with them. ``StepLosses`` keeps them
by step, so both reporters (the CLI's progress bar and a fine-tuning job's events) can tell the
latest value at any step and when an epoch's values are all known; they name the same step for
each value as the report's ``train_loss``, ``val_loss`` and their accuracies (and a job's
``step_metrics.csv``) do. ``finish`` adds anything the report has that no call brought.

``Reporter`` is what a run tells, ``trainer_callback`` feeds it from the Trainer, and
``Interrupts`` turns the first Ctrl-C into a stop after the current step.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapterdeck.core.loss import EVAL_ACCURACY, TRAIN_ACCURACY


class Reporter:
    """Where training tells the user what it is doing. The CLI shows it with rich."""

    def stage(self, name: str) -> None: ...
    def note(self, text: str) -> None: ...
    def progress(self, what: str, done: int, total: int) -> None: ...
    def train_start(self, total_steps: int) -> None: ...
    def train_step(
        self,
        step: int,
        loss: float | None,
        val_loss: float | None,
        *,
        accuracy: float | None = None,
        val_accuracy: float | None = None,
    ) -> None:
        """Step ``step`` is done: ``loss`` and ``val_loss`` are what was logged at it (None: nothing),
        ``accuracy`` and ``val_accuracy`` the mean token accuracies logged with them."""

    def train_end(self) -> None: ...


@dataclass(frozen=True)
class StepLoss:
    """What was logged at one step: the training loss, the validation loss, or both, each with the
    mean token accuracy logged with it (None where the trainer logs none)."""

    step: int
    train_loss: float | None
    valid_loss: float | None
    train_accuracy: float | None = None
    valid_accuracy: float | None = None


class StepLosses:
    """Every loss logged so far, by the step it was logged at."""

    def __init__(self) -> None:
        self.train: dict[int, float] = {}
        self.valid: dict[int, float] = {}
        self.train_accuracy: dict[int, float] = {}
        self.valid_accuracy: dict[int, float] = {}
        #: Every value logged at a step up to this one is known.
        self.known_through = 0

    def reached(
        self,
        step: int,
        loss: float | None,
        val_loss: float | None,
        accuracy: float | None = None,
        val_accuracy: float | None = None,
    ) -> list[StepLoss]:
        """Take a ``train_step`` call; returns the step if it logged anything (none or one)."""
        for table, value in (
            (self.train, loss),
            (self.valid, val_loss),
            (self.train_accuracy, accuracy),
            (self.valid_accuracy, val_accuracy),
        ):
            if value is not None:
                table[step] = float(value)
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
        for key, table in (
            ("train_mean_token_accuracy", self.train_accuracy),
            ("val_mean_token_accuracy", self.valid_accuracy),
        ):
            for point in training.get(key) or []:
                table.setdefault(point["step"], float(point["accuracy"]))
        self.known_through = max(self.known_through, int(training.get("steps") or 0), *new, 0)
        return [self.at(step) for step in sorted(new)]

    def at(self, step: int) -> StepLoss:
        """What was logged at ``step`` exactly."""
        return StepLoss(
            step,
            self.train.get(step),
            self.valid.get(step),
            self.train_accuracy.get(step),
            self.valid_accuracy.get(step),
        )

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


def trainer_callback(reporter: Reporter, stop: dict[str, bool]) -> Any:
    """A Trainer callback that tells ``reporter`` each step and stops training once ``stop`` asks."""
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        """Reports each step once its losses are logged: the Trainer ends a step (``on_step_end``),
        then logs its training loss and validates (``on_log``, ``on_evaluate``), then begins the
        next one. So a step is reported when the next begins, or when training ends."""

        step: int | None = None
        loss: float | None = None
        val: float | None = None
        accuracy: float | None = None
        val_accuracy: float | None = None

        def _report(self) -> None:
            if self.step is not None:
                reporter.train_step(
                    self.step, self.loss, self.val, accuracy=self.accuracy, val_accuracy=self.val_accuracy
                )
            self.step, self.loss, self.val, self.accuracy, self.val_accuracy = None, None, None, None, None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            reporter.train_start(state.max_steps)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._report()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            from adapterdeck.core.distributed import agree

            self.step = state.global_step
            # Several processes stop after the same step: when any of them was asked to.
            stop["requested"] = agree(stop["requested"])
            if stop["requested"]:
                control.should_training_stop = True

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs and state.global_step == self.step:
                self.loss = float(logs["loss"])
                self.accuracy = _number(logs.get(TRAIN_ACCURACY))

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any
        ) -> None:
            if metrics and "eval_loss" in metrics and state.global_step == self.step:
                self.val = float(metrics["eval_loss"])
                self.val_accuracy = _number(metrics.get(EVAL_ACCURACY))

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._report()
            reporter.train_end()

    return ReportProgress()


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


class Interrupts:
    """First Ctrl-C: stop after this step. Second: abort now."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.state = {"requested": False}
        self._previous: Any = None

    def __enter__(self) -> dict[str, bool]:
        def handler(signum: int, frame: Any) -> None:
            if self.state["requested"]:
                raise KeyboardInterrupt
            self.state["requested"] = True
            self.reporter.note("stopping after this step and saving (Ctrl-C again to abort)")

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self.state

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
