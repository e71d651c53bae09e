"""The training child of a fine-tuning worker: ``python -m adapterdeck.serve.finetune.child SPEC``.

It runs one job's training from the spec the worker wrote and reports its progress (stages, a
metrics event per logged step, each epoch's losses, the test evaluation) and its error as JSON
lines on its stdout, a pipe the worker reads (``Worker._relay``) and turns into job events.
Whatever libraries print goes to stderr, the job's log.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from adapterdeck.core import hookimpl
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.progress import StepLoss, StepLosses, epoch_ends
from adapterdeck.serve.finetune.parent import PARENT_ENV, die_with_parent
from adapterdeck.serve.finetune.spec import resolve_hyperparameters, run_config

MODULE = "adapterdeck.serve.finetune.child"


class _Fetched:
    """Answers ``fetch_adapter`` for the version the worker copied into the job's directory."""

    def __init__(self, ref: str, path: Path) -> None:
        self.ref, self.path = ref, path

    @hookimpl
    def fetch_adapter(self, ref: str) -> tuple[str, Path] | None:
        return (self.ref, self.path) if ref == self.ref else None


class _Emitter:
    """The child's side of the pipe: one JSON object per line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, kind: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"kind": kind, **fields}, default=str) + "\n")
        self.stream.flush()


class _Errors(_Emitter):
    """What a copy other than the main one says: its errors only."""

    def __call__(self, kind: str, **fields: Any) -> None:
        if kind == "error":
            super().__call__(kind, **fields)


class _JobReporter:
    """Training progress as job events: stages, a metrics event per step a loss was logged at (with
    the mean token accuracies logged with them, under OpenAI's names), each epoch's losses. Every
    value carries the step it was logged at (see ``core/progress.py``), as ``step_metrics.csv``
    does."""

    def __init__(self, emit: _Emitter, epochs: float) -> None:
        self.emit = emit
        self.epochs = epochs
        self.total = 0
        self.started = 0.0
        self.step = 0
        self.losses = StepLosses()
        self.epoch_ends: list[int] = []
        self.epochs_reported = 0

    def stage(self, name: str) -> None:
        self.emit("message", message=name[:1].upper() + name[1:])

    def note(self, text: str) -> None:
        self.emit("message", message=text)

    def progress(self, what: str, done: int, total: int) -> None:
        if done == total:
            self.emit("message", message=f"Evaluation: {what} {done}/{total}")

    def train_start(self, total_steps: int) -> None:
        self.total, self.started = total_steps, time.monotonic()
        self.epoch_ends = epoch_ends(total_steps, self.epochs)
        self.emit("message", message=f"Training: {total_steps} steps, {self.epochs:g} epoch(s)")

    def train_step(
        self,
        step: int,
        loss: float | None,
        val_loss: float | None,
        *,
        accuracy: float | None = None,
        val_accuracy: float | None = None,
    ) -> None:
        self.step = step
        for logged in self.losses.reached(step, loss, val_loss, accuracy, val_accuracy):
            self._metrics(logged)
        self._epochs()

    def train_end(self) -> None: ...

    def finish(self, training: dict[str, Any]) -> None:
        """The run's report is written: report what was logged at the last step, and the last epoch."""
        self.step = max(self.step, int(training.get("steps") or 0))
        for logged in self.losses.finish(training):
            self._metrics(logged)
        self._epochs()

    def _metrics(self, logged: StepLoss) -> None:
        elapsed = time.monotonic() - self.started
        step = self.step
        finish = time.time() + elapsed / step * (self.total - step) if step and step < self.total else None
        parts = [
            f"{what} loss={_fmt(value)}"
            for what, value in (("training", logged.train_loss), ("validation", logged.valid_loss))
            if value is not None
        ]
        self.emit(
            "metrics",
            message=f"Step {logged.step}/{self.total}: {', '.join(parts)}",
            data={
                "step": logged.step,
                "total_steps": self.total,
                "train_loss": logged.train_loss,
                "train_mean_token_accuracy": logged.train_accuracy,
                "valid_loss": logged.valid_loss,
                "valid_mean_token_accuracy": logged.valid_accuracy,
            },
            estimated_finish=finish,
        )

    def _epochs(self) -> None:
        """Each epoch's summary once every value logged up to its last step is known."""
        while (
            self.epochs_reported < len(self.epoch_ends)
            and self.epoch_ends[self.epochs_reported] <= self.losses.known_through
        ):
            end = self.epoch_ends[self.epochs_reported]
            self.epochs_reported += 1
            train, valid = self.losses.latest(end)
            self.emit(
                "message",
                message=f"Epoch {self.epochs_reported}/{len(self.epoch_ends)}: training loss {_fmt(train)}, "
                f"validation loss {_fmt(valid)}",
                data={"epoch": self.epochs_reported, "step": end, "train_loss": train, "valid_loss": valid},
            )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _stopped(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run_config(spec: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
    """The job's run config, from its spec and its resolved hyperparameters."""
    parent = spec.get("parent")
    return run_config(
        base=spec["base"],
        adapter_method=spec["adapter_method"],
        evaluators=spec["evaluators"],
        hyperparameters=resolved,
        seed=spec["seed"],
        objective=spec.get("objective"),
        init_adapter=parent["ref"] if parent else None,
        integrations=spec.get("integrations"),
        train=Path(spec["train"]),
        validation=Path(spec["validation"]) if spec.get("validation") else None,
        output=Path(spec["output"]),
    )


def launch(spec_path: str, processes: int) -> int:
    """Run the job's training as ``processes`` copies of this child (``core/distributed.py``), this
    process their agent: the copies inherit the pipe to the worker (only the main one reports),
    and when one of them dies the others are stopped and the worker is told it crashed."""
    from adapterdeck.core.distributed import launch as run_copies

    die_with_parent()
    os.environ[PARENT_ENV] = str(os.getpid())  # each copy dies with this agent
    emit = _Emitter(os.fdopen(os.dup(1), "w", buffering=1))
    ended = run_copies(["-m", MODULE, spec_path], processes)
    if ended.crashed:
        emit("error", code="training_crashed", message=ended.crashed)
    return ended.code


def main(spec_path: str, processes: int = 1) -> int:
    """Run one job's training from its spec; progress and errors go to the worker as JSON lines."""
    from adapterdeck.core.distributed import world

    here = world()
    if processes > 1 and not here.distributed:
        return launch(spec_path, processes)
    die_with_parent()
    # A cancel or a stopping worker ends the training with SIGTERM: stop as Ctrl-C does, so the
    # run's trackers record it killed before the process exits (SIGKILL follows the grace period).
    signal.signal(signal.SIGTERM, _stopped)
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever libraries print goes to the log, not into the protocol
    emit = _Emitter(protocol) if here.main else _Errors(protocol)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        from adapterdeck.core.config import parse_config
        from adapterdeck.core.plugins import catalog, plugin_manager
        from adapterdeck.core.train import run_training

        spec = json.loads(Path(spec_path).read_text())
        parent = spec.get("parent")
        if parent:  # the worker fetched it: the run reads that copy, under its registry ref
            plugin_manager().register(_Fetched(parent["ref"], Path(parent["path"])), "job-parent")
        method = catalog().method(spec["adapter_method"]["name"])
        resolved = resolve_hyperparameters(
            spec["hyperparameters"], spec["examples"], method.default_learning_rate, here.size
        )
        emit("hyperparameters", data=resolved)
        config = parse_config(_run_config(spec, resolved), f"job {spec['job_id']}")
        reporter = _JobReporter(emit, resolved["n_epochs"])
        result = run_training(config, reporter, overwrite=True, run_name=spec["job_id"])
        if result.report is None:
            return 0  # another copy of a multi-process training: the main one reports
        training = result.report["training"]
        reporter.finish(training)
        if training["stop_reason"] == "early_stopping":
            emit(
                "message",
                message=f"Stopped early at step {training['steps']} of {training['planned_steps']}: "
                f"the validation loss stopped improving; best step {training['best_step']}",
            )
        test = result.report.get("test")
        if test:
            parts = [
                f"{name} {_fmt(m['base']['value'])}"
                + (f" ({_fmt(m['base_few_shot']['value'])} few-shot)" if "base_few_shot" in m else "")
                + f" -> {_fmt(m['tuned']['value'])}"
                for name, m in test["metrics"].items()
            ]
            emit(
                "message",
                message=f"Evaluated on {test['examples']} test examples (base -> tuned): " + ", ".join(parts),
                data=test["metrics"],
            )
            if test.get("verdict"):
                emit("message", message=f"Prompt baseline: {test['verdict']}")
        return 0
    except AdapterdeckError as exc:
        emit("error", code="invalid_training_run", message=str(exc))
        return 2
    except KeyboardInterrupt:
        emit("error", code="training_stopped", message="the training was stopped by a signal")
        return 130
    except Exception as exc:
        import traceback

        traceback.print_exc()
        emit("error", code="training_failed", message=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    args = sys.argv[1:]
    copies = int(args[args.index("--processes") + 1]) if "--processes" in args else 1
    sys.exit(main(args[0], copies))
