"""What an experiment tracker plugin implements, and how a run uses the trackers it names.

A run config's ``log: {<tracker>: {<its parameters>}}`` records the run in experiment trackers: the
built-in ``mlflow``, or a third party's. Each tracker named is started once the data is validated
and before any model loads (``Tracker.start``: its server reached, the run opened, the run's
parameters recorded); one that cannot start stops the run there, with one error naming it. During
training a tracker gets every value the trainer logs (training and validation metrics), at its
step; at the end the test metrics, ``report.json``, ``loss.png`` and ``adapter/``, and the run's
status: ``finished``, ``failed``, or ``killed`` (Ctrl-C, a cancelled fine-tuning job). A tracker
that fails after it started is warned about and sent no more metrics; the run goes on, and its
artifacts and status are still sent at the end.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from adapterdeck.core import __version__
from adapterdeck.core.errors import AdapterdeckError

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from adapterdeck.core.config import RunConfig
    from adapterdeck.core.plugins import Catalog
    from adapterdeck.core.progress import Reporter

logger = logging.getLogger("adapterdeck.trackers")

FINISHED, FAILED, KILLED = "finished", "failed", "killed"


class TrackerParams(BaseModel):
    """Base of a tracker's parameters (``log.<tracker>:`` in run.yaml); unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class RunStart:
    """What a tracker is told as a run starts, before any model loads."""

    name: str  # the run's name: its output directory's, or a fine-tuning job's id
    #: The run config flattened to dotted keys (``train.epochs``), the method's and the objective's
    #: parameters as resolved (defaults included), ``data.sha256`` (the digest of the data files)
    #: and ``adapterdeck_version``; every value a string (lists and mappings as JSON).
    params: dict[str, str]
    output: Path  # the run directory: ``report.json``, ``loss.png`` and ``adapter/`` end up there


class TrackedRun(ABC):
    """One run as a tracker records it: what ``Tracker.start`` returns."""

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record values logged at ``step``: the trainer's (``loss``, ``eval_loss``, ``learning_rate``,
        an objective's ``rewards/chosen``...) and, at the last step, the test metrics
        (``test/<evaluator>/<base|base_few_shot|tuned>``)."""

    @abstractmethod
    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """Store these files and directories, each under its own name (``adapter/`` whole)."""

    @abstractmethod
    def finish(self, status: str) -> None:
        """Record how the run ended: ``finished``, ``failed`` or ``killed``."""


class Tracker(ABC):
    """An experiment tracker. Subclass it and register an instance."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: Its parameters, with their defaults.
    params: ClassVar[type[TrackerParams]] = TrackerParams

    @abstractmethod
    def start(self, params: TrackerParams, run: RunStart) -> TrackedRun:
        """Reach the tracker, open the run and record ``run.params``; raise when it cannot (an
        ``AdapterdeckError`` whose message says why, or any exception)."""


def run_params(
    config: dict[str, Any], resolved: Mapping[str, Mapping[str, Any]], data_sha256: str, version: str
) -> dict[str, str]:
    """``RunStart.params``: ``config`` (a run config as JSON values, without ``log``) flattened, the
    sections in ``resolved`` (``{"method": {...}}``) over it, the data digest and the version."""
    flat: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            flat[key] = value if isinstance(value, str) else json.dumps(value)

    walk({k: v for k, v in config.items() if k != "log"}, "")
    for section, values in resolved.items():
        walk(dict(values), section)
    flat["data.sha256"] = data_sha256
    flat["adapterdeck_version"] = version
    return flat


def evaluation_metrics(test: Mapping[str, Any] | None) -> dict[str, float]:
    """The report's ``test`` section as metrics: ``test/<evaluator>/<model>`` (the headline value)
    and ``test/<evaluator>/<model>/<figure>`` (an evaluator's further figures, such as perplexity)."""
    found: dict[str, float] = {}
    for evaluator, entry in ((test or {}).get("metrics") or {}).items():
        for model, figures in entry.items():
            if not isinstance(figures, dict):
                continue
            for figure, value in figures.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    suffix = "" if figure == "value" else f"/{figure}"
                    found[f"test/{evaluator}/{model}{suffix}"] = float(value)
    return found


class RunTrackers:
    """The trackers of one run (see the module's docstring); a context manager that records the
    run's end: ``failed`` on an exception, ``killed`` on ``KeyboardInterrupt``, else the status
    ``end`` found."""

    def __init__(self, runs: Sequence[tuple[str, TrackedRun]], reporter: Reporter) -> None:
        self.runs = list(runs)
        self.reporter = reporter
        self.broken: set[str] = set()
        self.status = FINISHED

    @classmethod
    def for_run(
        cls,
        config: RunConfig,
        plugins: Catalog,
        data_sha256: str,
        resolved: tuple[BaseModel, BaseModel],
        run_name: str | None,
        reporter: Reporter,
    ) -> RunTrackers:
        """Start the trackers ``config.log`` names, before any model loads, with the run's
        parameters (``resolved``: the method's and the objective's); see ``start``."""
        wanted = [(name, plugins.tracker(name), config.tracker_params(name, plugins)) for name in config.log]
        if not wanted:
            return cls([], reporter)
        reporter.stage("starting the run's trackers")
        method, objective = (p.model_dump(mode="json") for p in resolved)
        sections = {
            "method": {"name": config.method.name, **method},
            "objective": {"name": config.objective.name, **objective},
        }
        flat = run_params(config.model_dump(mode="json"), sections, data_sha256, __version__)
        return cls.start(wanted, RunStart(run_name or config.output.name, flat, config.output), reporter)

    @classmethod
    def start(
        cls, wanted: Sequence[tuple[str, Tracker, TrackerParams]], run: RunStart, reporter: Reporter
    ) -> RunTrackers:
        """Start each tracker; when one cannot start, those started before it are finished
        ``failed`` and an ``AdapterdeckError`` names it (``log.<name>: ...``)."""
        started = cls([], reporter)
        for name, tracker, params in wanted:
            try:
                started.runs.append((name, tracker.start(params, run)))
            except KeyboardInterrupt:
                started.finish(KILLED)
                raise
            except Exception as exc:
                started.finish(FAILED)
                reason = str(exc) if isinstance(exc, AdapterdeckError) else f"{type(exc).__name__}: {exc}"
                raise AdapterdeckError(f"log.{name}: cannot start tracking the run: {reason}") from None
            reporter.note(f"tracking the run with {name}")
        return started

    def __enter__(self) -> RunTrackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is not None:
            self.status = KILLED if issubclass(kind, KeyboardInterrupt) else FAILED
        self.finish(self.status)

    def callbacks(self) -> list[TrainerCallback]:
        """The Trainer callback that sends every value it logs to the trackers (none without any)."""
        if not self.runs:
            return []
        from transformers import TrainerCallback

        trackers = self

        class LogToTrackers(TrainerCallback):
            """Sends what the Trainer logs (training and validation metrics) at the step it logs it."""

            def on_log(
                self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any
            ) -> None:
                if logs:
                    trackers.log_metrics(logs, state.global_step)

        return [LogToTrackers()]

    def log_metrics(self, logs: Mapping[str, Any], step: int) -> None:
        """Send the numbers among ``logs`` to every tracker that has not failed."""
        metrics = {
            k: float(v) for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if not metrics:
            return
        for name, tracked in self._working():
            self._call(
                name,
                f"logging metrics at step {step}",
                lambda t=tracked: t.log_metrics(metrics, step),
                then=f"; no more metrics go to {name}, the run goes on",
            )

    def end(self, report: Mapping[str, Any], run_dir: Path) -> None:
        """The run is written: send its test metrics, report.json, loss.png and adapter/; its status
        becomes ``killed`` when it was interrupted, else ``finished``."""
        metrics = evaluation_metrics(report.get("test"))
        if metrics:
            self.log_metrics(metrics, int(report["training"]["steps"]))
        written = (run_dir / "report.json", run_dir / "loss.png", run_dir / "adapter")
        paths = [p for p in written if p.exists()]
        for name, tracked in self.runs:
            self._call(name, "storing the artifacts", lambda t=tracked: t.log_artifacts(paths))
        self.status = KILLED if report.get("status") == "interrupted" else FINISHED

    def finish(self, status: str) -> None:
        """Record the run's status in every tracker, once."""
        runs, self.runs = self.runs, []
        for name, tracked in runs:
            self._call(name, f"recording the status {status}", lambda t=tracked: t.finish(status))

    def _working(self) -> Iterator[tuple[str, TrackedRun]]:
        return ((name, tracked) for name, tracked in self.runs if name not in self.broken)

    def _call(self, name: str, what: str, call: Callable[[], None], then: str = "") -> None:
        """Make one call to a tracker; a failure is warned about, and no metrics go to it after."""
        try:
            call()
        except Exception as exc:
            self.broken.add(name)
            message = f"log.{name}: {what} failed ({type(exc).__name__}: {exc})"
            logger.info("%s", message)  # the reporter shows it: not twice on a console
            self.reporter.note(message + then)
