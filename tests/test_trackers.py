"""Experiment trackers: the built-in ``mlflow`` (the real mlflow client on a SQLite store under the
test's directory, no server), the ``register_trackers`` hook with a third party's tracker, and what
is refused before any model loads."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from adapterdeck.core import hookimpl
from adapterdeck.core.config import parse_config
from adapterdeck.core.demo import write_demo_dataset
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.plugins import TrackerRegister, catalog, register_plugin, unregister_plugin
from adapterdeck.core.progress import Reporter
from adapterdeck.core.trackers import RunStart, RunTrackers, TrackedRun, Tracker, TrackerParams
from adapterdeck.core.train import run_training

from .conftest import free_port


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "support.jsonl", task="support", n=60)


def store(tmp_path: Path) -> dict[str, str]:
    """An MLflow store in the test's directory: its database and its artifacts."""
    return {
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "artifact_location": (tmp_path / "artifacts").as_uri(),
    }


def config_for(base: Path, data: Path, out: Path, log: Any, **train: Any) -> dict[str, Any]:
    """A short run on the tiny base: 6 steps, the loss logged every 2, validated every 3."""
    return {
        "base": str(base),
        "data": {"train": str(data)},
        "method": {"name": "lora", "r": 8},
        "train": {"learning_rate": 3e-3, "max_steps": 6, "batch_size": 8, "logging_steps": 2,
                  "eval_steps": 3, **train},
        "eval": {"evaluators": ["loss"], "samples": 1, "base_shots": 0},
        "output": str(out),
        "log": log,
    }  # fmt: skip


class Stages(Reporter):
    """Records the stages a run went through and what it noted."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.notes: list[str] = []

    def stage(self, name: str) -> None:
        self.stages.append(name)

    def note(self, text: str) -> None:
        self.notes.append(text)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


# -- the built-in mlflow tracker ---------------------------------------------------------------------


def test_a_run_is_logged_to_mlflow(base_model: Path, data: Path, tmp_path: Path) -> None:
    where = store(tmp_path)
    log = {"mlflow": {**where, "experiment": "support", "tags": {"team": "acme"}}}
    result = run_training(parse_config(config_for(base_model, data, tmp_path / "run-1", log)))
    report = result.report
    client = MlflowClient(tracking_uri=where["tracking_uri"])
    experiment = client.get_experiment_by_name("support")
    assert experiment is not None and experiment.artifact_location == where["artifact_location"]
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "run-1"
    assert run.data.tags["team"] == "acme"

    params = run.data.params
    assert params["base"] == str(base_model) and params["data.sha256"] == report["data"]["sha256"]
    assert params["method.name"] == "lora" and params["method.r"] == "8"
    assert params["method.alpha"] == "32.0"  # the method's defaults, as resolved
    assert params["objective.name"] == "sft" and params["train.max_steps"] == "6"
    assert params["eval.evaluators"] == '["loss"]' and params["adapterdeck_version"]
    assert not [k for k in params if k.startswith("log")]  # the tracking URI is no parameter

    # Every loss the report has, at its step, logged once each (no second logger such as
    # transformers' own MLflowCallback: the run's report_to stays "none").
    training = report["training"]
    assert history(client, run_id, "loss") == [(p["step"], p["loss"]) for p in training["train_loss"]]
    assert [s for s, _ in history(client, run_id, "loss")] == [2, 4, 6]
    assert history(client, run_id, "eval_loss") == [(p["step"], p["loss"]) for p in training["val_loss"]]
    assert [s for s, _ in history(client, run_id, "learning_rate")] == [2, 4, 6]
    tuned = report["test"]["metrics"]["loss"]["tuned"]
    assert history(client, run_id, "test/loss/tuned") == [(6, tuned["value"])]
    assert history(client, run_id, "test/loss/tuned/perplexity") == [(6, tuned["perplexity"])]

    top = {a.path for a in client.list_artifacts(run_id)}
    assert top == {"report.json", "loss.png", "adapter"}
    adapter = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter
    assert "adapter/adapterdeck.json" in adapter
    copy = Path(client.download_artifacts(run_id, "report.json", str(tmp_path / "download")))
    assert json.loads(copy.read_text()) == json.loads((result.run_dir / "report.json").read_text())
    assert Path(where["artifact_location"].removeprefix("file://"), run_id).is_dir()

    # A second run goes into the same experiment, under the name it is given.
    log["mlflow"]["run_name"] = "second"
    config = config_for(base_model, data, tmp_path / "run-2", log, max_steps=2, eval_steps=2)
    run_training(parse_config(config))
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    assert [r.info.run_name for r in runs] == ["run-1", "second"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_tracker_configs_are_refused_with_the_reason(
    base_model: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = store(tmp_path)
    cases = [
        ({"mlfow": good}, "log.mlfow: unknown tracker 'mlfow' (did you mean 'mlflow'?); known trackers:"),
        ({"mlflow": {**good, "experimnt": "x"}}, "log.mlflow.experimnt: unknown key (did you mean 'experim"),
        ({"mlflow": {**good, "experiment": ""}}, "log.mlflow.experiment: String should have at least 1 ch"),
        ({"mlflow": {**good, "tags": ["a"]}}, "log.mlflow.tags: Input should be a valid dictionary"),
        ({"mlflow": {}}, "log.mlflow.tracking_uri: Value error, not set, and MLFLOW_TRACKING_URI is not set"),
        ({"mlflow": None}, "log.mlflow.tracking_uri: Value error, not set, and MLFLOW_TRACKING_URI"),
        ("mlflow", "log.mlflow.tracking_uri: Value error, not set, and MLFLOW_TRACKING_URI"),
        (["mlflow"], "log: Input should be a valid dictionary"),
    ]  # fmt: skip
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for log, expected in cases:
        with pytest.raises(AdapterdeckError) as info:
            parse_config(config_for(base_model, data, tmp_path / "run", log), "run.yaml")
        assert str(info.value).startswith(f"run.yaml: {expected}"), (log, str(info.value))
    # The tracking URI defaults to MLflow's own environment variable.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", good["tracking_uri"])
    config = parse_config(config_for(base_model, data, tmp_path / "run", "mlflow"))
    assert config.tracker_params("mlflow").tracking_uri == good["tracking_uri"]  # type: ignore[attr-defined]


def test_a_server_that_cannot_be_reached_stops_the_run_before_the_model_loads(
    base_model: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries: minutes
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    stages = Stages()
    with pytest.raises(AdapterdeckError) as info:
        config = config_for(base_model, data, tmp_path / "run", {"mlflow": {"tracking_uri": uri}})
        run_training(parse_config(config), stages)
    message = str(info.value)
    assert message.startswith(
        f"log.mlflow: cannot start tracking the run: cannot log to {uri}: MlflowException"
    )
    assert "Connection refused" in message
    assert stages.stages == ["validating data", "starting the run's trackers"]
    assert not (tmp_path / "run").exists()


# -- the hook --------------------------------------------------------------------------------------


class RecorderParams(TrackerParams):
    label: str = "x"
    interrupt_at: int | None = None  # Ctrl-C, as a user presses it, once this step is logged


class Recorded(TrackedRun):
    def __init__(self, log: list[tuple[str, Any]], interrupt_at: int | None) -> None:
        self.log, self.interrupt_at = log, interrupt_at

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.log.append(("metrics", (step, dict(metrics))))
        if self.interrupt_at is not None and step >= self.interrupt_at:
            self.interrupt_at = None
            os.kill(os.getpid(), signal.SIGINT)

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        self.log.append(("artifacts", [p.name for p in paths]))

    def finish(self, status: str) -> None:
        self.log.append(("finish", status))


class Recorder(Tracker):
    """A third party's tracker: it keeps what it is sent."""

    name = "recorder"
    params = RecorderParams

    def __init__(self) -> None:
        self.runs: list[tuple[RunStart, str, list[tuple[str, Any]]]] = []

    def start(self, params: TrackerParams, run: RunStart) -> TrackedRun:
        assert isinstance(params, RecorderParams)
        log: list[tuple[str, Any]] = []
        self.runs.append((run, params.label, log))
        return Recorded(log, params.interrupt_at)


class Flaky(Tracker):
    """Loses its server after the first metrics it gets, or cannot reach it at all."""

    name = "flaky"

    class Params(TrackerParams):
        reachable: bool = True

    params = Params

    def start(self, params: TrackerParams, run: RunStart) -> TrackedRun:
        assert isinstance(params, Flaky.Params)
        if not params.reachable:
            raise ConnectionError("connection refused")
        calls: list[str] = []

        class Run(TrackedRun):
            def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
                calls.append("metrics")
                if len(calls) > 1:
                    raise ConnectionError("server went away")

            def log_artifacts(self, paths: Sequence[Path]) -> None:
                calls.append("artifacts")

            def finish(self, status: str) -> None:
                calls.append(status)

        self.calls = calls
        return Run()


def test_hook_register_trackers(fresh_plugins: None, base_model: Path, data: Path, tmp_path: Path) -> None:
    recorder, flaky = Recorder(), Flaky()

    class Plugin:
        @hookimpl
        def register_trackers(self, register: TrackerRegister) -> None:
            register.add_tracker(recorder)
            register.add_tracker(flaky)
            register.add_tracker(Recorder())  # the name is taken

    register_plugin(Plugin(), name="tracker-plugin")
    try:
        cat = catalog()
        assert {"mlflow", "recorder", "flaky"} <= set(cat.trackers)
        assert cat.trackers["recorder"].origin.label == "registered in code"
        assert any(
            "tracker 'recorder' is already registered by tracker-plugin" in p.error for p in cat.problems
        )
        with pytest.raises(
            AdapterdeckError, match=r"log\.recorder\.lable: unknown key \(did you mean 'label'\?\)"
        ):
            parse_config(config_for(base_model, data, tmp_path / "r", {"recorder": {"lable": "y"}}))

        # A run logged to both: the recorder gets everything; the flaky one is warned about once
        # when it fails, gets no more metrics, and still gets the artifacts and the status.
        stages = Stages()
        log = {"recorder": {"label": "mine"}, "flaky": {}}
        result = run_training(parse_config(config_for(base_model, data, tmp_path / "run", log)), stages)
        (start, label, events), = recorder.runs  # fmt: skip
        assert label == "mine" and start.name == "run" and start.output == tmp_path / "run"
        assert (
            start.params["method.name"] == "lora"
            and start.params["data.sha256"] == result.report["data"]["sha256"]
        )
        logged = [value for kind, value in events if kind == "metrics"]
        train_loss = result.report["training"]["train_loss"]
        assert [(s, m["loss"]) for s, m in logged if "loss" in m] == [
            (p["step"], p["loss"]) for p in train_loss
        ]
        assert [s for s, m in logged if "eval_loss" in m] == [3, 6]
        assert all("grad_norm" in m and "learning_rate" in m for _, m in logged if "loss" in m)
        tuned = result.report["test"]["metrics"]["loss"]["tuned"]["value"]
        assert logged[-1][0] == 6 and logged[-1][1]["test/loss/tuned"] == tuned  # the test metrics, last
        assert events[-2:] == [("artifacts", ["report.json", "loss.png", "adapter"]), ("finish", "finished")]
        assert flaky.calls == ["metrics", "metrics", "artifacts", "finished"]
        warned = [n for n in stages.notes if n.startswith("log.flaky:")]
        assert len(warned) == 1 and "logging metrics at step" in warned[0]
        assert "ConnectionError: server went away" in warned[0] and warned[0].endswith("the run goes on")
        assert result.report["status"] == "succeeded"

        # A tracker that cannot be reached stops the run before the model loads; one started
        # before it is finished "failed".
        stages = Stages()
        log = {"recorder": {}, "flaky": {"reachable": False}}
        with pytest.raises(AdapterdeckError) as info:
            run_training(parse_config(config_for(base_model, data, tmp_path / "unreached", log)), stages)
        assert (
            str(info.value) == "log.flaky: cannot start tracking the run: ConnectionError: connection refused"
        )
        assert recorder.runs[-1][2] == [("finish", "failed")]
        assert "loading the base model" not in stages.stages and not (tmp_path / "unreached").exists()

        # Ctrl-C: the run stops after that step, writes what it has, and is recorded killed.
        log = {"recorder": {"interrupt_at": 2}}
        config = config_for(base_model, data, tmp_path / "stopped", log, max_steps=200)
        result = run_training(parse_config(config))
        assert result.report["status"] == "interrupted"
        events = recorder.runs[-1][2]
        assert events[-2:] == [("artifacts", ["report.json", "loss.png", "adapter"]), ("finish", "killed")]
    finally:
        unregister_plugin("tracker-plugin")


def test_a_run_that_raises_is_failed_and_one_stopped_at_once_is_killed() -> None:
    """The second Ctrl-C (or a cancelled job's SIGTERM) raises KeyboardInterrupt out of the run."""
    for raised, status in ((RuntimeError("out of memory"), "failed"), (KeyboardInterrupt(), "killed")):
        log: list[tuple[str, Any]] = []
        with pytest.raises(type(raised)), RunTrackers([("recorder", Recorded(log, None))], Stages()):
            raise raised
        assert log == [("finish", status)]
