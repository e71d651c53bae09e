"""Training progress names the step each loss (and the token accuracy logged with it) was logged
at: a fine-tuning job's events, its ``step_metrics.csv`` and the run's report agree step for step,
and so do the progress lines of ``adapterdeck train``; the last step's losses are reported too.

Real training on the tiny offline base: a worker in this process on a real SQLite registry (its
training child is a real process), and the real CLI in a subprocess.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import yaml

from adapterdeck.core.demo import write_demo_dataset
from adapterdeck.core.progress import StepLosses, epoch_ends
from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.finetune import FineTuning
from adapterdeck.serve.finetune.worker import Worker
from adapterdeck.serve.settings import FineTuneSettings

from .conftest import run_cli

Losses = dict[int, tuple[float | None, float | None]]


def _latest(table: Losses, step: int, index: int) -> float | None:
    found = [(s, v[index]) for s, v in table.items() if s <= step and v[index] is not None]
    return max(found)[1] if found else None


def _from_report(training: dict) -> Losses:
    steps: Losses = {}
    for index, key in ((0, "train_loss"), (1, "val_loss")):
        for point in training[key]:
            pair = list(steps.get(point["step"], (None, None)))
            pair[index] = point["loss"]
            steps[point["step"]] = (pair[0], pair[1])
    return steps


def test_job_events_step_metrics_and_report_agree_step_for_step(base_model: Path, tmp_path: Path) -> None:
    registry = Registry(RegistrySettings(home=tmp_path / "home"))
    try:
        ft = FineTuning(registry)
        data = write_demo_dataset(tmp_path / "reviews.jsonl", task="sentiment", n=40, seed=1)
        file = ft.add_file("acme", data.name, "fine-tune", path=data, format="chat", examples=40)
        job = ft.create_job(
            "acme", model="tiny", base=str(base_model), training_file=file.id, validation_file=None,
            suffix="progress", seed=0, hyperparameters={"n_epochs": 3, "batch_size": 4},
            adapter_method={"name": "lora", "r": 4}, evaluators=["loss"], metadata=None, max_attempts=1,
        )  # fmt: skip
        ft.files_validated(job.id, {})
        worker = Worker(registry, FineTuneSettings(heartbeat_seconds=0.5), worker_id="test:progress")
        claimed = ft.claim_next(worker.worker_id, 60)
        assert claimed is not None
        worker.run_job(claimed)
        done = ft.get_job(job.id, "acme")
        events = list(reversed(ft.list_events(job.id, limit=1000).items))
        assert done.status == "succeeded", [e.message for e in events]

        files = {ft.get_file(i, "acme").filename: ft.get_file(i, "acme") for i in done.result_files}
        report = json.loads(ft.file_content(files["report.json"]))
        training = report["training"]
        rows = list(csv.DictReader(io.StringIO(ft.file_content(files["step_metrics.csv"]).decode())))
        csv_steps: Losses = {
            int(r["step"]): (
                float(r["train_loss"]) if r["train_loss"] else None,
                float(r["valid_loss"]) if r["valid_loss"] else None,
            )
            for r in rows
        }
        report_steps = _from_report(training)
        assert csv_steps == report_steps

        metrics = [e for e in events if e.type == "metrics"]
        event_steps: Losses = {e.data["step"]: (e.data["train_loss"], e.data["valid_loss"]) for e in metrics}
        assert len(event_steps) == len(metrics)  # one event per logged step
        assert event_steps == csv_steps
        assert [e.data["step"] for e in metrics] == sorted(event_steps)  # in the order they were logged
        # The mean token accuracies logged with the losses, under OpenAI's names, step for step too.
        csv_accuracies = {
            int(r["step"]): tuple(
                float(r[k]) if r[k] else None for k in ("train_accuracy", "valid_mean_token_accuracy")
            )
            for r in rows
        }
        event_accuracies = {
            e.data["step"]: (e.data["train_mean_token_accuracy"], e.data["valid_mean_token_accuracy"])
            for e in metrics
        }
        assert event_accuracies == csv_accuracies
        assert all((train is None) == (csv_steps[s][0] is None) for s, (train, _) in csv_accuracies.items())
        last = training["steps"]
        assert last in event_steps and event_steps[last][1] is not None  # the last step's evaluation
        total = training["planned_steps"]
        for event in metrics:
            train, valid = event_steps[event.data["step"]]
            parts = [
                f"{w} loss={v:.4f}" for w, v in (("training", train), ("validation", valid)) if v is not None
            ]
            assert event.message == f"Step {event.data['step']}/{total}: {', '.join(parts)}"

        # Each epoch's summary: the losses logged last at or before its final step.
        summaries = [e for e in events if e.message.startswith("Epoch ")]
        ends = [end for end in epoch_ends(total, 3) if end <= last]
        assert [e.data["step"] for e in summaries] == ends and ends
        for event in summaries:
            end = event.data["step"]
            assert (event.data["train_loss"], event.data["valid_loss"]) == (
                _latest(csv_steps, end, 0),
                _latest(csv_steps, end, 1),
            ), event.message
        # The summaries and the step events come in step order.
        order = [e.data["step"] for e in events if e.type == "metrics" or e.message.startswith("Epoch ")]
        assert order == sorted(order)
    finally:
        registry.close()


def test_train_progress_lines_name_the_step_each_loss_was_measured_at(
    base_model: Path, tmp_path: Path
) -> None:
    data = write_demo_dataset(tmp_path / "reviews.jsonl", task="sentiment", n=60, seed=2)
    config = {
        "base": str(base_model),
        "data": {"train": str(data)},
        "method": {"name": "lora", "r": 4},
        # Validation every 3 steps, training loss every 2: they meet at 6, and the last step (10)
        # is evaluated because it is the last.
        "train": {
            "max_steps": 10,
            "batch_size": 4,
            "eval_steps": 3,
            "logging_steps": 2,
            "learning_rate": 3e-3,
        },
        "early_stopping": {"patience": 10},  # never stops early: 4 evaluations
        "eval": {"evaluators": ["loss"], "base_shots": 0, "samples": 0, "cache_base": False},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("train", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    training = json.loads((tmp_path / "run" / "report.json").read_text())["training"]
    steps = _from_report(training)
    printed = {
        int(m["step"]): (float(m["train"]) if m["train"] != "-" else None, float(m["valid"]))
        for m in re.finditer(
            r"step (?P<step>\d+): train loss (?P<train>[-\d.]+), validation loss (?P<valid>[\d.]+)",
            result.stdout,
        )
    }
    evaluated = sorted(s for s, (_, valid) in steps.items() if valid is not None)
    assert evaluated == [3, 6, 9, 10]
    assert sorted(printed) == evaluated, result.stdout
    # Each validation's line shows its token accuracy too.
    pattern = r"step (?P<step>\d+): .*, validation token accuracy (?P<accuracy>[\d.]+%)"
    accuracies = {int(m["step"]): m["accuracy"] for m in re.finditer(pattern, result.stdout)}
    assert accuracies == {p["step"]: f"{p['accuracy']:.1%}" for p in training["val_mean_token_accuracy"]}
    for step, (train, valid) in printed.items():
        assert valid == round(steps[step][1], 4)  # type: ignore[arg-type]
        expected = _latest(steps, step, 0)
        assert train == (round(expected, 4) if expected is not None else None), step


def test_step_losses_credit_each_value_to_the_step_it_was_logged_at() -> None:
    # The calls the trainer's callback makes: once a step is done, the values logged at it.
    losses = StepLosses()
    calls = [(1, None, None), (2, 1.5, None), (3, None, 2.0), (4, 1.5, None), (5, None, None)]
    revealed = [found for call in calls for found in losses.reached(*call)]
    assert [(f.step, f.train_loss, f.valid_loss) for f in revealed] == [
        (2, 1.5, None),
        (3, None, 2.0),
        (4, 1.5, None),
    ]
    assert losses.known_through == 5
    # What the report has and no call brought (here step 6) is added at the end.
    report = {
        "steps": 6,
        "train_loss": [{"step": 2, "loss": 1.5}, {"step": 4, "loss": 1.5}, {"step": 6, "loss": 1.25}],
        "val_loss": [{"step": 3, "loss": 2.0}, {"step": 6, "loss": 1.75}],
    }
    assert [(f.step, f.train_loss, f.valid_loss) for f in losses.finish(report)] == [(6, 1.25, 1.75)]
    assert losses.latest(5) == (1.5, 2.0) and losses.latest(1) == (None, None)
    assert epoch_ends(6, 3) == [2, 4, 6] and epoch_ends(10, 3) == [4, 7, 10]
