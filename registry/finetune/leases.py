"""The worker side of fine-tuning: claiming queued jobs, holding them with a lease renewed by
heartbeats, and finishing them.

Claiming is safe with many workers on many machines: on PostgreSQL the queued row is taken with
``SELECT ... FOR UPDATE SKIP LOCKED`` (a second worker skips it and takes the next one), on SQLite
the claim runs in a ``BEGIN IMMEDIATE`` transaction (one writer at a time). A job whose lease ran
out (its worker died or lost the database) is requeued while it has attempts left, else failed;
any worker's sweep and the gateway's reads find such jobs. Every change a worker makes is
conditional on the job still being its own running job, so a cancelled or taken-back job is
never overwritten.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, select, update

import adapterdeck.registry.schema as t
from adapterdeck.registry.db import now, utc, write_transaction
from adapterdeck.registry.finetune.names import (
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    VALIDATING,
    VALIDATION_TIMEOUT,
)
from adapterdeck.registry.finetune.records import JobRecord, NewCheckpoint, insert_event, select_job


class WorkerLeases:
    """The worker part of ``FineTuning``."""

    engine: Engine

    def claim_next(
        self, worker_id: str, lease_seconds: float, models: list[str] | None = None
    ) -> JobRecord | None:
        """Take the oldest queued job (of one of ``models``, when given) for ``worker_id``, or None."""
        query = select(t.ft_jobs.c.seq).where(t.ft_jobs.c.status == QUEUED)
        if models is not None:
            query = query.where(t.ft_jobs.c.model.in_(models))
        with self.engine.connect() as conn:  # idle workers poll: no write lock while nothing is queued
            if conn.execute(query.limit(1)).first() is None:
                return None
        at = now()
        with write_transaction(self.engine) as conn:
            # PostgreSQL: a row another worker is claiming is skipped, not waited for. SQLite ignores
            # FOR UPDATE; its BEGIN IMMEDIATE already lets one claimer in at a time.
            seq = conn.execute(
                query.order_by(t.ft_jobs.c.seq).limit(1).with_for_update(skip_locked=True)
            ).scalar()
            if seq is None:
                return None
            conn.execute(
                update(t.ft_jobs)
                .where(t.ft_jobs.c.seq == seq, t.ft_jobs.c.status == QUEUED)
                .values(
                    status=RUNNING,
                    worker_id=worker_id,
                    attempts=t.ft_jobs.c.attempts + 1,
                    heartbeat_at=at,
                    lease_expires_at=at + timedelta(seconds=lease_seconds),
                    started_at=func.coalesce(t.ft_jobs.c.started_at, at),
                    publishing=0,
                )
            )
            job_id = conn.execute(select(t.ft_jobs.c.id).where(t.ft_jobs.c.seq == seq)).scalar_one()
            return select_job(conn, job_id, None)

    def _mine(self, job_id: str, worker_id: str) -> Any:
        return and_(
            t.ft_jobs.c.id == job_id, t.ft_jobs.c.worker_id == worker_id, t.ft_jobs.c.status == RUNNING
        )

    def heartbeat(self, job_id: str, worker_id: str, lease_seconds: float) -> bool:
        """Renew the lease; False when the job is no longer this worker's running job (cancelled, or
        taken back after the lease ran out): the worker must stop it."""
        at = now()
        with write_transaction(self.engine) as conn:
            return bool(
                conn.execute(
                    update(t.ft_jobs)
                    .where(self._mine(job_id, worker_id))
                    .values(heartbeat_at=at, lease_expires_at=at + timedelta(seconds=lease_seconds))
                ).rowcount
            )

    def record_hyperparameters(self, job_id: str, worker_id: str, resolved: dict[str, Any]) -> None:
        with write_transaction(self.engine) as conn:
            conn.execute(
                update(t.ft_jobs).where(self._mine(job_id, worker_id)).values(hyperparameters=resolved)
            )

    def start_publishing(self, job_id: str, worker_id: str, lease_seconds: float) -> bool:
        """Mark the job as publishing (no cancel from now on) and hold it for ``lease_seconds``;
        False if it is no longer ours."""
        at = now()
        with write_transaction(self.engine) as conn:
            return bool(
                conn.execute(
                    update(t.ft_jobs)
                    .where(self._mine(job_id, worker_id))
                    .values(
                        publishing=1,
                        heartbeat_at=at,
                        lease_expires_at=at + timedelta(seconds=lease_seconds),
                    )
                ).rowcount
            )

    def succeed(
        self,
        job_id: str,
        worker_id: str,
        *,
        ref: str,
        checkpoints: list[NewCheckpoint],
        result_files: list[str],
        trained_tokens: int | None,
    ) -> bool:
        at = now()
        with write_transaction(self.engine) as conn:
            job = select_job(conn, job_id, None)
            name = job.planned_model_name
            changed = conn.execute(
                update(t.ft_jobs)
                .where(self._mine(job_id, worker_id))
                .values(
                    status=SUCCEEDED,
                    fine_tuned_model=name,
                    result_ref=ref,
                    result_files=result_files,
                    trained_tokens=trained_tokens,
                    finished_at=at,
                    estimated_finish=None,
                    lease_expires_at=None,
                )
            ).rowcount
            if not changed:
                return False
            for ckpt in checkpoints:
                conn.execute(
                    t.ft_checkpoints.insert().values(
                        job_id=job_id,
                        step=ckpt.step,
                        metrics=ckpt.metrics,
                        name=f"{name}:ckpt-step-{ckpt.step}",
                        ref=ckpt.ref,
                        created_at=at,
                    )
                )
            insert_event(
                conn,
                job_id,
                "The job has successfully completed",
                data={"fine_tuned_model": name, "ref": ref},
            )
        return True

    def fail(self, job_id: str, worker_id: str, code: str, message: str, param: str | None = None) -> bool:
        with write_transaction(self.engine) as conn:
            changed = conn.execute(
                update(t.ft_jobs)
                .where(self._mine(job_id, worker_id))
                .values(
                    status=FAILED,
                    error={"code": code, "message": message, "param": param},
                    finished_at=now(),
                    estimated_finish=None,
                    lease_expires_at=None,
                )
            ).rowcount
            if changed:
                insert_event(conn, job_id, f"The job failed: {message}", level="error")
        return bool(changed)

    def release(self, job_id: str, worker_id: str, reason: str) -> bool:
        """Give a running job back to the queue (the worker is stopping); the try does not count."""
        with write_transaction(self.engine) as conn:
            changed = conn.execute(
                update(t.ft_jobs)
                .where(self._mine(job_id, worker_id))
                .values(
                    status=QUEUED,
                    worker_id=None,
                    attempts=t.ft_jobs.c.attempts - 1,
                    heartbeat_at=None,
                    lease_expires_at=None,
                    estimated_finish=None,
                    publishing=0,
                )
            ).rowcount
            if changed:
                insert_event(conn, job_id, f"{reason}; the job is back in the queue", level="warn")
        return bool(changed)

    def retry(self, job_id: str, worker_id: str, code: str, message: str) -> str | None:
        """A training that crashed (a process died, not the data or the config): requeue the job
        while it has attempts left, as for a dead worker, else fail it. Its new status, or None
        when the job is no longer this worker's."""
        with write_transaction(self.engine) as conn:
            row = conn.execute(
                select(t.ft_jobs.c.attempts, t.ft_jobs.c.max_attempts).where(self._mine(job_id, worker_id))
            ).first()
            if row is None:
                return None
            at = now()
            if row.attempts < row.max_attempts:
                values: dict[str, Any] = {"status": QUEUED, "worker_id": None, "heartbeat_at": None}
                text = f"{message}; job requeued after attempt {row.attempts} of {row.max_attempts}"
                level = "warn"
            else:
                text = f"{message}, on the last of {row.max_attempts} attempts"
                values = {
                    "status": FAILED,
                    "error": {"code": code, "message": text, "param": None},
                    "finished_at": at,
                }
                level = "error"
            values.update(lease_expires_at=None, estimated_finish=None, publishing=0)
            conn.execute(update(t.ft_jobs).where(self._mine(job_id, worker_id)).values(**values))
            insert_event(conn, job_id, text if level == "warn" else f"The job failed: {text}", level=level)
        return values["status"]

    def sweep(self) -> list[tuple[str, str]]:
        """Requeue (or fail, with no attempts left) running jobs whose lease ran out, and fail jobs
        stuck in validation. Returns ``(job id, new status)`` for each; cheap when there are none."""
        at = now()
        running_stale = and_(t.ft_jobs.c.status == RUNNING, t.ft_jobs.c.lease_expires_at < at)
        validating_stale = and_(
            t.ft_jobs.c.status == VALIDATING, t.ft_jobs.c.created_at < at - VALIDATION_TIMEOUT
        )
        with self.engine.connect() as conn:
            if not conn.execute(select(func.count()).where(running_stale | validating_stale)).scalar_one():
                return []
        changed: list[tuple[str, str]] = []
        with write_transaction(self.engine) as conn:
            rows = conn.execute(
                select(
                    t.ft_jobs.c.id,
                    t.ft_jobs.c.status,
                    t.ft_jobs.c.attempts,
                    t.ft_jobs.c.max_attempts,
                    t.ft_jobs.c.worker_id,
                    t.ft_jobs.c.heartbeat_at,
                )
                .where(running_stale | validating_stale)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                if row.status == VALIDATING:
                    message = "File validation was interrupted (the gateway stopped); create the job again."
                    values: dict[str, Any] = {
                        "status": FAILED,
                        "error": {"code": "validation_interrupted", "message": message, "param": None},
                        "finished_at": at,
                    }
                    level = "error"
                elif row.attempts < row.max_attempts:
                    message = (
                        f"Worker {row.worker_id} stopped heartbeating (last at {utc(row.heartbeat_at)}); "
                        f"job requeued after attempt {row.attempts} of {row.max_attempts}"
                    )
                    values = {"status": QUEUED, "worker_id": None, "heartbeat_at": None, "publishing": 0}
                    level = "warn"
                else:
                    message = (
                        f"Worker {row.worker_id} stopped heartbeating (last at {utc(row.heartbeat_at)}) "
                        f"on the last of {row.max_attempts} attempts"
                    )
                    values = {
                        "status": FAILED,
                        "error": {"code": "worker_lost", "message": message, "param": None},
                        "finished_at": at,
                    }
                    level = "error"
                values.update(lease_expires_at=None, estimated_finish=None)
                conn.execute(
                    update(t.ft_jobs)
                    .where(t.ft_jobs.c.id == row.id, t.ft_jobs.c.status == row.status)
                    .values(**values)
                )
                insert_event(conn, row.id, message, level=level, data={"worker": row.worker_id})
                changed.append((row.id, values["status"]))
        return changed
