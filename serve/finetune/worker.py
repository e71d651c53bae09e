"""Fine-tuning workers: ``adapterdeck worker`` claims queued jobs from the registry and runs them.

A worker takes one job at a time (see ``registry/finetune`` for claiming and leases). The
training runs in a child process (``python -m adapterdeck.serve.finetune.child SPEC``, see
``child.py``) that reports its progress as JSON lines on a pipe; the worker turns them into job
events. A thread renews the job's lease every ``heartbeat_seconds``; when the renewal finds the
job cancelled (or taken back after the lease ran out), the worker stops the child's process group
at once, so a cancel takes effect within seconds and nothing of that job is published. The child
dies with its worker (Linux parent-death signal), so a killed worker leaves no training behind:
its job's lease runs out and any worker's sweep, or the gateway, requeues or fails it.

On success the worker publishes the run's checkpoints and then the final adapter as versions of
``tenant/ft-SUFFIX-ID`` and records the job's fine-tuned model name, which the gateway resolves to
the final version (``resolve_fine_tuned``).
"""

from __future__ import annotations

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
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.report import checkpoint_metrics, step_metrics_csv
from adapterdeck.registry import NotFound, PublishRefused, Registry
from adapterdeck.registry.finetune import PURPOSE_RESULTS, FineTuning, JobRecord, NewCheckpoint
from adapterdeck.registry.private import PRIVATE_UMASK, create_private, private_dir
from adapterdeck.serve.finetune.parent import PARENT_ENV, WORKER_INDEX_ENV
from adapterdeck.serve.settings import FineTuneSettings

logger = logging.getLogger("adapterdeck.worker")
CHILD = "adapterdeck.serve.finetune.child"  # the module the training child runs
SOURCE = "fine-tuned"
# Publishing (validating and storing the checkpoints and the adapter) holds the job this long at
# least: a slow publish on a busy machine must not look like a dead worker.
PUBLISH_LEASE_SECONDS = 300.0


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

    outcome: str  # "done", "failed", "crashed" (a process died: retried), "lost" or "stopping"
    code: str | None = None
    message: str | None = None


def device_group(settings: FineTuneSettings, index: int) -> list[str] | None:
    """The GPUs worker ``index`` trains on: its group of ``devices_per_job`` of ``finetune.devices``
    (None: not set, every GPU the machine has, or the CPU). Refused at start, with one line, when
    the group is incomplete or the machine has fewer GPUs than a job needs."""
    need = settings.devices_per_job
    if settings.devices is not None:
        group = settings.devices[index * need : (index + 1) * need]
        if len(group) < need:
            raise AdapterdeckError(
                f"finetune.devices lists {len(settings.devices)} devices: worker {index} has "
                f"{len(group)} of the {need} finetune.devices_per_job asks for"
            )
        return group
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < need:
        raise AdapterdeckError(
            f"finetune.devices_per_job is {need} but this machine has {torch.cuda.device_count()} GPUs"
        )
    return None


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
        self.devices = device_group(settings, int(os.environ.get(WORKER_INDEX_ENV) or 0))
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
            except SQLAlchemyError as exc:
                logger.warning("cannot reach the registry database: %s", exc)
                job = None
            except Exception:
                logger.exception("cannot sweep or claim fine-tuning jobs")
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
            elif run.outcome == "crashed":
                self.jobs.retry(job.id, self.worker_id, run.code or "training_crashed", run.message or "")
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

    def _parent(self, job: JobRecord, job_dir: Path) -> dict[str, str] | None:
        """The version a continued job starts from, copied into the job's directory (the adapter
        cache may evict its own copy while the run reads it)."""
        if not job.parent:
            return None
        try:
            source = self.registry.materialize(self.registry.resolve(job.parent["ref"]))
        except NotFound:
            raise JobError(
                "invalid_model",
                f"{job.parent['model']} was deleted before the job could continue it",
                "model",
            ) from None
        target = job_dir / "parent"
        shutil.copytree(source, target)
        return {"ref": job.parent["ref"], "path": str(target)}

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
            "parent": self._parent(job, job_dir),
            "base": self.base or job.base,
            "adapter_method": job.adapter_method,
            "objective": job.objective,
            "integrations": job.integrations,
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
        processes = self.settings.devices_per_job
        command = [sys.executable, "-m", CHILD, str(spec)]
        if processes > 1:
            command += ["--processes", str(processes)]
        if self.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
                text=True,
                umask=PRIVATE_UMASK,  # the run (checkpoints, report, adapter) is the tenant's
            )
        self.jobs.add_event(
            job.id,
            f"Training process {proc.pid} started"
            + (f" ({processes} data-parallel processes)" if processes > 1 else ""),
            data={"worker": self.worker_id, "pid": proc.pid, "processes": processes, "devices": self.devices},
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
            if error.get("code") == "training_crashed":  # a process died: not the job's fault
                return _Run("crashed", "training_crashed", message)
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
    """A checkpoint's ``metrics`` as OpenAI names them (see ``core/report.py``)."""
    return checkpoint_metrics(report["training"], step)


def _step_metrics(report: dict[str, Any]) -> bytes:
    """The results file OpenAI clients expect: one row per logged step, OpenAI's columns first."""
    return step_metrics_csv(report["training"]).encode()
