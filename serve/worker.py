"""Fine-tuning workers: ``adapterdeck worker`` claims queued jobs from the registry and runs them.

A worker takes one job at a time (see ``registry/finetune.py`` for claiming and leases). The
training runs in a child process (``python -m adapterdeck.serve.worker SPEC``) that reports its
progress as JSON lines on a pipe; the worker turns them into job events. A thread renews the
job's lease every ``heartbeat_seconds``; when the renewal finds the job cancelled (or taken back
after the lease ran out), the worker stops the child's process group at once, so a cancel takes
effect within seconds and nothing of that job is published. The child dies with its worker (Linux
parent-death signal), so a killed worker leaves no training behind: its job's lease runs out and
any worker's sweep, or the gateway, requeues or fails it.

On success the worker publishes the run's checkpoints and then the final adapter as versions of
``tenant/ft-SUFFIX-ID`` and records the job's fine-tuned model name, which the gateway resolves to
the final version (``resolve_fine_tuned``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.progress import StepLoss, StepLosses, epoch_ends
from adapterdeck.registry import NotFound, PublishRefused, Registry
from adapterdeck.registry.finetune import (
    PURPOSE_RESULTS,
    FineTuning,
    JobRecord,
    NewCheckpoint,
)
from adapterdeck.registry.private import PRIVATE_UMASK, create_private, private_dir
from adapterdeck.serve.settings import FineTuneSettings, ServeSettings

logger = logging.getLogger("adapterdeck.worker")
AUTO = "auto"
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 8
MIN_TRAINING_EXAMPLES = 10
SOURCE = "fine-tuned"
# Publishing (validating and storing the checkpoints and the adapter) holds the job this long at
# least: a slow publish on a busy machine must not look like a dead worker.
PUBLISH_LEASE_SECONDS = 300.0
PARENT_ENV = "ADAPTERDECK_PARENT_PID"


# -- the run a job asks for ---------------------------------------------------------------------


def resolve_hyperparameters(requested: dict[str, Any], examples: int, default_lr: float) -> dict[str, Any]:
    """Concrete values for ``n_epochs``, ``batch_size`` and ``learning_rate_multiplier`` ("auto" or not).

    auto: 3 epochs; a batch of 8, or a tenth of the examples for smaller files; the method's own
    learning rate (multiplier 1).
    """
    epochs = requested.get("n_epochs", AUTO)
    batch = requested.get("batch_size", AUTO)
    multiplier = requested.get("learning_rate_multiplier", AUTO)
    return {
        "n_epochs": DEFAULT_EPOCHS if epochs == AUTO else int(epochs),
        "batch_size": min(DEFAULT_BATCH_SIZE, max(1, examples // 10)) if batch == AUTO else int(batch),
        "learning_rate_multiplier": 1.0 if multiplier == AUTO else float(multiplier),
        "learning_rate": default_lr * (1.0 if multiplier == AUTO else float(multiplier)),
    }


def run_config(
    *,
    base: str,
    adapter_method: dict[str, Any],
    evaluators: list[str],
    hyperparameters: dict[str, Any],
    seed: int,
    train: Path,
    validation: Path | None,
    output: Path,
) -> dict[str, Any]:
    """The ``adapterdeck train`` run config of a job (``hyperparameters`` already resolved)."""
    data: dict[str, Any] = {"train": str(train)}
    if validation is not None:
        data["validation"] = str(validation)
    return {
        "base": base,
        "data": data,
        "method": dict(adapter_method),
        "train": {
            "epochs": hyperparameters["n_epochs"],
            "batch_size": hyperparameters["batch_size"],
            "learning_rate": hyperparameters["learning_rate"],
            "seed": seed,
        },
        "eval": {"evaluators": list(evaluators), "samples": 3},
        "output": str(output),
    }


def check_job_config(
    *, base: str, adapter_method: dict[str, Any], evaluators: list[str], hyperparameters: dict[str, Any]
) -> None:
    """Raise ``AdapterdeckError`` naming the key when the method, its parameters, the evaluators or
    the hyperparameters would not make a valid run config."""
    from adapterdeck.core.config import parse_config
    from adapterdeck.core.plugins import catalog

    name = adapter_method.get("name")
    plugins = catalog()
    if name not in plugins.methods:
        raise AdapterdeckError(f"adapterdeck.method: {plugins.unknown('method', str(name), failures=False)}")
    for i, evaluator in enumerate(evaluators):
        if evaluator not in plugins.evaluators:
            unknown = plugins.unknown("evaluator", evaluator, failures=False)
            raise AdapterdeckError(f"adapterdeck.evaluators.{i}: {unknown}")
    resolved = resolve_hyperparameters(hyperparameters, 100, plugins.method(str(name)).default_learning_rate)
    config = run_config(
        base=base,
        adapter_method=adapter_method,
        evaluators=evaluators,
        hyperparameters=resolved,
        seed=0,
        train=Path("train.jsonl"),
        validation=None,
        output=Path("run"),
    )
    parse_config(config, "adapterdeck")


# -- the training child -------------------------------------------------------------------------


def die_with_parent() -> None:
    """When started by a supervising process (``ADAPTERDECK_PARENT_PID``: ``serve`` or a worker), ask
    Linux to SIGKILL this process when that parent dies; exit now if it already has. A worker
    started by hand is left alone (its shell may well exit before it)."""
    expected = os.environ.get(PARENT_ENV)
    if not expected:
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe to the worker breaks instead
        pass
    if os.getppid() != int(expected):
        os._exit(1)


class _Emitter:
    """The child's side of the pipe: one JSON object per line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, kind: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"kind": kind, **fields}, default=str) + "\n")
        self.stream.flush()


class _JobReporter:
    """Training progress as job events: stages, a metrics event per step a loss was logged at, each
    epoch's losses. Every value carries the step it was logged at (see ``core/progress.py``), as
    ``step_metrics.csv`` does."""

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

    def train_step(self, step: int, loss: float | None, val_loss: float | None) -> None:
        self.step = step
        for logged in self.losses.reached(step, loss, val_loss):
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
                "valid_loss": logged.valid_loss,
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


def _child(spec_path: str) -> int:
    """Run one job's training from its spec; progress and errors go to the worker as JSON lines."""
    die_with_parent()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever libraries print goes to the log, not into the protocol
    emit = _Emitter(protocol)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        from adapterdeck.core.config import parse_config
        from adapterdeck.core.plugins import catalog
        from adapterdeck.core.train import run_training

        spec = json.loads(Path(spec_path).read_text())
        method = catalog().method(spec["adapter_method"]["name"])
        resolved = resolve_hyperparameters(
            spec["hyperparameters"], spec["examples"], method.default_learning_rate
        )
        emit("hyperparameters", data=resolved)
        config = parse_config(
            run_config(
                base=spec["base"],
                adapter_method=spec["adapter_method"],
                evaluators=spec["evaluators"],
                hyperparameters=resolved,
                seed=spec["seed"],
                train=Path(spec["train"]),
                validation=Path(spec["validation"]) if spec.get("validation") else None,
                output=Path(spec["output"]),
            ),
            f"job {spec['job_id']}",
        )
        reporter = _JobReporter(emit, resolved["n_epochs"])
        result = run_training(config, reporter, overwrite=True)
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
    except Exception as exc:
        import traceback

        traceback.print_exc()
        emit("error", code="training_failed", message=f"{type(exc).__name__}: {exc}")
        return 1


# -- the worker ---------------------------------------------------------------------------------


class JobError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class _Heartbeat(threading.Thread):
    """Renews a job's lease; sets ``lost`` when the job is no longer this worker's to run."""

    def __init__(self, jobs: FineTuning, job_id: str, worker_id: str, settings: FineTuneSettings) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.jobs, self.job_id, self.worker_id, self.settings = jobs, job_id, worker_id, settings
        self.lease_seconds = settings.lease_seconds
        self.lost = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        last_ok = time.monotonic()
        while not self._done.wait(self.settings.heartbeat_seconds):
            try:
                if self.jobs.heartbeat(self.job_id, self.worker_id, self.lease_seconds):
                    last_ok = time.monotonic()
                    continue
                self.lost.set()
                return
            except Exception as exc:  # the database is unreachable: keep trying while the lease holds
                logger.warning("heartbeat of %s failed: %s", self.job_id, exc)
                if time.monotonic() - last_ok > self.lease_seconds:
                    self.lost.set()
                    return

    def stop(self) -> None:
        self._done.set()
        self.join()


@dataclass
class _Run:
    """A finished training child: how it ended."""

    outcome: str  # "done", "failed", "lost" or "stopping"
    code: str | None = None
    message: str | None = None


class Worker:
    """Claims and runs fine-tuning jobs until ``stop()``; one job at a time."""

    def __init__(
        self,
        registry: Registry,
        settings: FineTuneSettings,
        *,
        base: str | None = None,
        base_name: str | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.registry = registry
        self.jobs = FineTuning(registry)
        self.settings = settings
        self.base = base
        self.models = [base_name] if base_name else None
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        home = registry.settings.home.expanduser()
        self.workdir = (settings.workdir or home / "finetune").expanduser()
        self.log_dir = home / "logs" / "finetune"
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        self._warm_up()
        logger.info("worker %s waiting for fine-tuning jobs", self.worker_id)
        next_sweep = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    for job_id, status in self.jobs.sweep():
                        logger.warning("job %s: its worker stopped heartbeating; now %s", job_id, status)
                    next_sweep = time.monotonic() + max(1.0, self.settings.lease_seconds / 3)
                job = self.jobs.claim_next(self.worker_id, self.settings.lease_seconds, self.models)
            except Exception as exc:
                logger.warning("cannot reach the registry database: %s", exc)
                job = None
            if job is None:
                self._stop.wait(self.settings.poll_seconds)
                continue
            self.run_job(job)
        logger.info("worker %s stopped", self.worker_id)

    def _warm_up(self) -> None:
        """Import what publishing needs now: a first import of torch or transformers holds the
        interpreter lock for seconds, which must not happen while a heartbeat is due."""
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        except ImportError as exc:
            logger.warning("cannot import the training libraries: %s", exc)

    def run_job(self, job: JobRecord) -> None:
        """Run a claimed job to its end: succeeded, failed, cancelled or back in the queue."""
        logger.info("job %s: started (attempt %d of %d)", job.id, job.attempts, job.max_attempts)
        job_dir = self.workdir / job.id
        heart = _Heartbeat(self.jobs, job.id, self.worker_id, self.settings)
        heart.start()
        try:
            self.jobs.add_event(
                job.id,
                f"Fine-tuning job started on worker {self.worker_id} "
                f"(attempt {job.attempts} of {job.max_attempts})",
                data={"worker": self.worker_id, "attempt": job.attempts},
            )
            spec = self._prepare(job, job_dir)
            run = self._train(job, spec, heart)
            if run.outcome == "done":
                self._publish(job, job_dir / "run", heart)
            elif run.outcome == "failed":
                raise JobError(run.code or "training_failed", run.message or "training failed")
        except JobError as exc:
            self.jobs.fail(job.id, self.worker_id, exc.code, exc.message, exc.param)
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            self.jobs.fail(job.id, self.worker_id, "internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            heart.stop()
            shutil.rmtree(job_dir, ignore_errors=True)

    def _prepare(self, job: JobRecord, job_dir: Path) -> Path:
        shutil.rmtree(job_dir, ignore_errors=True)
        private_dir(job_dir / "data")  # the tenant's training data, then the run
        paths: dict[str, str | None] = {"train": None, "validation": None}
        examples = 0
        for key, file_id, param in (
            ("train", job.training_file, "training_file"),
            ("validation", job.validation_file, "validation_file"),
        ):
            if file_id is None:
                continue
            try:
                record = self.jobs.get_file(file_id, job.tenant)
            except NotFound:
                raise JobError(
                    f"invalid_{param}", f"{param} {file_id} was deleted before the job could use it", param
                ) from None
            target = job_dir / "data" / f"{key}.jsonl"
            create_private(target)
            target.write_bytes(self.jobs.file_content(record))
            paths[key] = str(target)
            examples = examples or (record.examples or 0)
        spec = {
            "job_id": job.id,
            "base": self.base or job.base,
            "adapter_method": job.adapter_method,
            "evaluators": job.evaluators,
            "hyperparameters": job.hyperparameters,
            "examples": examples,
            "seed": job.seed,
            **paths,
            "output": str(job_dir / "run"),
        }
        spec_path = job_dir / "spec.json"
        create_private(spec_path)
        spec_path.write_text(json.dumps(spec, indent=2))
        return spec_path

    def _train(self, job: JobRecord, spec: Path, heart: _Heartbeat) -> _Run:
        private_dir(self.log_dir)
        log_path = self.log_dir / f"{job.id}.log"
        create_private(log_path)
        env = {**os.environ, PARENT_ENV: str(os.getpid()), "TOKENIZERS_PARALLELISM": "false"}
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "adapterdeck.serve.worker", str(spec)],
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
                text=True,
                umask=PRIVATE_UMASK,  # the run (checkpoints, report, adapter) is the tenant's
            )
        self.jobs.add_event(
            job.id,
            f"Training process {proc.pid} started",
            data={"worker": self.worker_id, "pid": proc.pid},
        )
        error: dict[str, Any] = {}
        reader = threading.Thread(target=self._relay, args=(job, proc, error), daemon=True)
        reader.start()
        reason = None
        while proc.poll() is None:
            if heart.lost.wait(0.2):
                reason = "lost"
            elif self._stop.is_set():
                reason = "stopping"
            if reason:
                self._terminate(proc)
                break
        reader.join(timeout=10)
        if reason == "stopping":
            self.jobs.release(job.id, self.worker_id, f"Worker {self.worker_id} is stopping")
            return _Run("stopping")
        if reason == "lost" or heart.lost.is_set():
            status = self.jobs.get_job(job.id, None).status
            why = "the job was cancelled" if status == "cancelled" else "this worker lost the job's lease"
            self.jobs.add_event(
                job.id,
                f"Training process {proc.pid} stopped: {why}",
                level="warn",
                data={"pid": proc.pid, "worker": self.worker_id, "status": status},
            )
            return _Run("lost")
        if proc.returncode != 0:
            message = (
                error.get("message")
                or f"the training process exited with {proc.returncode}; the worker's job log has the details"
            )
            return _Run("failed", error.get("code") or "training_failed", message)
        return _Run("done")

    def _relay(self, job: JobRecord, proc: subprocess.Popen, error: dict[str, Any]) -> None:
        """Turn the child's JSON lines into job events."""
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                item = json.loads(line)
                kind = item.pop("kind")
                if kind == "error":
                    error.update(item)
                elif kind == "hyperparameters":
                    resolved = {k: v for k, v in item["data"].items() if k != "learning_rate"}
                    self.jobs.record_hyperparameters(job.id, self.worker_id, resolved)
                    listed = ", ".join(f"{k}={v:g}" for k, v in item["data"].items())
                    self.jobs.add_event(job.id, f"Hyperparameters: {listed}", data=item["data"])
                else:
                    finish = item.get("estimated_finish")
                    self.jobs.add_event(
                        job.id,
                        item["message"],
                        type="metrics" if kind == "metrics" else "message",
                        data=item.get("data"),
                        estimated_finish=datetime.fromtimestamp(finish, UTC) if finish else None,
                    )
            except Exception as exc:  # a garbled line, or the database briefly away
                logger.warning("job %s: cannot record progress %r: %s", job.id, line[:200], exc)

    def _terminate(self, proc: subprocess.Popen) -> None:
        """Stop the child's whole process group: SIGTERM, then SIGKILL after the grace period."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=self.settings.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()

    def _publish(self, job: JobRecord, run_dir: Path, heart: _Heartbeat) -> None:
        heart.lease_seconds = max(self.settings.lease_seconds, PUBLISH_LEASE_SECONDS)
        if heart.lost.is_set() or not self.jobs.start_publishing(job.id, self.worker_id, heart.lease_seconds):
            self._not_ours(job)
            return
        report = json.loads((run_dir / "report.json").read_text())
        checkpoints = []
        try:
            for step, directory in _checkpoints(run_dir):
                if heart.lost.is_set():
                    self._not_ours(job)
                    return
                staged = private_dir(run_dir / f".publish-{step}")
                for name in ("adapter_config.json", "adapter_model.safetensors"):
                    shutil.copy2(directory / name, staged / name)
                shutil.copy2(run_dir / "adapter" / "adapterdeck.json", staged / "adapterdeck.json")
                info = self.registry.publish(staged, job.adapter, source=SOURCE)
                metrics = _checkpoint_metrics(report, step)
                checkpoints.append(NewCheckpoint(step, metrics, info.ref))
                self.jobs.add_event(
                    job.id,
                    f"Checkpoint at step {step} published as {info.ref}",
                    data={"step": step, "ref": info.ref, "metrics": metrics},
                )
            if heart.lost.is_set():
                self._not_ours(job)
                return
            final = self.registry.publish(run_dir, job.adapter, source=SOURCE)
        except PublishRefused as exc:
            raise JobError("publish_refused", str(exc)) from None
        self.jobs.add_event(job.id, f"Published the fine-tuned model as {final.ref}", data={"ref": final.ref})
        results = [
            self.jobs.add_file(
                job.tenant, "step_metrics.csv", PURPOSE_RESULTS, data=_step_metrics(report)
            ).id,
            self.jobs.add_file(
                job.tenant, "report.json", PURPOSE_RESULTS, data=(run_dir / "report.json").read_bytes()
            ).id,
        ]
        done = self.jobs.succeed(
            job.id,
            self.worker_id,
            ref=final.ref,
            checkpoints=checkpoints,
            result_files=results,
            trained_tokens=report["training"].get("tokens_seen"),
        )
        if not done:
            logger.warning("job %s: published %s but the job was taken from this worker", job.id, final.ref)

    def _not_ours(self, job: JobRecord) -> None:
        message = "Training finished, but the job is no longer this worker's; nothing more is published"
        self.jobs.add_event(job.id, message, level="warn", data={"worker": self.worker_id})


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The checkpoints the Trainer kept (``checkpoints/checkpoint-N``), by step."""
    found = []
    for directory in (run_dir / "checkpoints").glob("checkpoint-*"):
        step = directory.name.rsplit("-", 1)[-1]
        if step.isdigit() and (directory / "adapter_model.safetensors").exists():
            found.append((int(step), directory))
    return sorted(found)


def _checkpoint_metrics(report: dict[str, Any], step: int) -> dict[str, Any]:
    training = report["training"]
    train = [p["loss"] for p in training["train_loss"] if p["step"] <= step]
    valid = [p["loss"] for p in training["val_loss"] if p["step"] == step]
    return {
        "step": step,
        "train_loss": train[-1] if train else None,
        "valid_loss": valid[-1] if valid else None,
    }


def _step_metrics(report: dict[str, Any]) -> bytes:
    """The results file OpenAI clients expect: one row per logged step."""
    training = report["training"]
    valid = {p["step"]: p["loss"] for p in training["val_loss"]}
    rows = {p["step"]: [p["loss"], valid.get(p["step"])] for p in training["train_loss"]}
    for step, loss in valid.items():
        rows.setdefault(step, [None, loss])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "train_loss", "valid_loss"])
    for step in sorted(rows):
        writer.writerow([step, *("" if v is None else v for v in rows[step])])
    return out.getvalue().encode()


# -- local workers of `adapterdeck serve` ---------------------------------------------------------


class LocalWorkers:
    """``adapterdeck serve``'s own workers: ``adapterdeck worker`` processes, restarted if they die."""

    def __init__(self, settings: ServeSettings, env: dict[str, str], log_dir: Path) -> None:
        self.settings = settings
        self.env = env
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen | None] = [None] * settings.finetune.workers
        self.restarts = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "adapterdeck.core.cli",
            "worker",
            "--settings-json",
            self.settings.model_dump_json(),
        ]

    def start(self) -> None:
        private_dir(self.log_dir)
        for index in range(len(self.processes)):
            thread = threading.Thread(
                target=self._supervise, args=(index,), name=f"worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _supervise(self, index: int) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            env = {**os.environ, **self.env, PARENT_ENV: str(os.getpid())}
            log_path = self.log_dir / f"worker-{index}.log"
            create_private(log_path)
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    self.command(),
                    stdout=log,
                    stderr=log,
                    env=env,
                    start_new_session=True,
                    umask=PRIVATE_UMASK,
                )
            self.processes[index] = proc
            started = time.monotonic()
            logger.info("fine-tuning worker %d started (pid %d)", index, proc.pid)
            code = proc.wait()
            if self._stopping.is_set():
                return
            self.restarts += 1
            backoff = 1.0 if time.monotonic() - started > 60 else min(60.0, backoff * 2)
            logger.warning("fine-tuning worker %d exited with %s; restarting in %.0f s", index, code, backoff)
            self._stopping.wait(backoff)

    def stop(self) -> None:
        """SIGTERM every worker (each puts its running job back in the queue), then wait."""
        self._stopping.set()
        for proc in self.processes:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + self.settings.finetune.stop_grace_seconds + 20
        for proc in self.processes:
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for thread in self._threads:
            thread.join(timeout=5)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
