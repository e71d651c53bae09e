"""Fine-tuning jobs in the registry database: ``FineTuning`` holds uploaded files
(``files``), jobs, their events and checkpoints, and the worker side (``leases``).

The HTTP API records files and jobs here; workers claim queued jobs, hold them with a lease and
finish them. A cancelled job's status changes here at once; the worker notices at its next
heartbeat (the heartbeat only renews a job that is still running and still its own) and stops the
training. Once a worker starts publishing a result (``publishing``), a cancel is refused instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

import adapterdeck.registry.schema as t
from adapterdeck.registry.cache import Lru
from adapterdeck.registry.db import Page, ensure_tenant, fetch_page, now, write_transaction
from adapterdeck.registry.errors import Conflict, NotFound
from adapterdeck.registry.finetune.files import UploadedFiles
from adapterdeck.registry.finetune.leases import WorkerLeases
from adapterdeck.registry.finetune.names import (
    CANCELLED,
    CHECKPOINT_PREFIX,
    EVENT_PREFIX,
    FAILED,
    FINISHED,
    JOB_PREFIX,
    QUEUED,
    SUCCEEDED,
    VALIDATING,
    named_tenant,
    new_id,
)
from adapterdeck.registry.finetune.records import (
    JOB_COLUMNS,
    JOB_FROM,
    JobRecord,
    checkpoint_record,
    event_record,
    insert_event,
    job_record,
    parse_cursor,
    select_job,
    seq_of,
)
from adapterdeck.registry.registry import Registry
from adapterdeck.registry.store import FileStore


class FineTuning(UploadedFiles, WorkerLeases):
    """Files, jobs, events and checkpoints of fine-tuning, on a ``Registry``'s database and storage.

    ``tenant`` arguments scope reads and changes to one tenant; None means every tenant (an admin).
    Another tenant's file or job is reported exactly like a missing one.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.engine = registry.engine
        self.files = FileStore(registry.store, "finetune/files")

    def create_job(
        self,
        tenant: str,
        *,
        model: str,
        base: str,
        training_file: str,
        validation_file: str | None,
        suffix: str | None,
        seed: int,
        hyperparameters: dict[str, Any],
        adapter_method: dict[str, Any],
        evaluators: list[str],
        metadata: dict[str, str] | None,
        max_attempts: int,
        objective: dict[str, Any] | None = None,
        parent: dict[str, str] | None = None,
        integrations: list[dict[str, Any]] | None = None,
    ) -> JobRecord:
        """Record a job in ``validating_files``; ``files_validated`` or ``fail`` moves it on."""
        job_id = new_id(JOB_PREFIX)
        at = now()
        with write_transaction(self.engine) as conn:
            conn.execute(
                t.ft_jobs.insert().values(
                    id=job_id,
                    tenant_id=ensure_tenant(conn, tenant),
                    status=VALIDATING,
                    model=model,
                    base=base,
                    training_file=training_file,
                    validation_file=validation_file,
                    suffix=suffix,
                    seed=seed,
                    hyperparameters=hyperparameters,
                    adapter_method=adapter_method,
                    objective=objective,
                    parent=parent,
                    integrations=integrations or None,
                    evaluators=evaluators,
                    user_metadata=metadata,
                    result_files=[],
                    attempts=0,
                    max_attempts=max_attempts,
                    publishing=0,
                    created_at=at,
                )
            )
            files = f"{training_file}" + (
                f" and validation file {validation_file}" if validation_file else ""
            )
            self.add_event(job_id, f"Validating training file: {files}", conn=conn)
        return self.get_job(job_id, tenant)

    def files_validated(self, job_id: str, details: dict[str, Any]) -> JobRecord:
        """The job's files passed validation: queue it for a worker."""
        with write_transaction(self.engine) as conn:
            changed = conn.execute(
                update(t.ft_jobs)
                .where(t.ft_jobs.c.id == job_id, t.ft_jobs.c.status == VALIDATING)
                .values(status=QUEUED)
            ).rowcount
            if changed:
                self.add_event(job_id, "Files validated, moving job to queued state", data=details, conn=conn)
        return self.get_job(job_id, None)

    def get_job(self, job_id: str, tenant: str | None, *, conn: Connection | None = None) -> JobRecord:
        if conn is not None:
            return select_job(conn, job_id, tenant)
        with self.engine.connect() as own:
            return select_job(own, job_id, tenant)

    def list_jobs(self, tenant: str | None, *, after: str | None = None, limit: int = 20) -> Page:
        """Jobs, newest first; ``after`` is the last job id of the previous page."""
        query = select(*JOB_COLUMNS).select_from(JOB_FROM)
        if tenant is not None:
            query = query.where(t.tenants.c.name == tenant)
        with self.engine.connect() as conn:
            mark = seq_of(conn, t.ft_jobs, after, tenant, "No such fine-tuning job")
            return fetch_page(conn, query, t.ft_jobs.c.seq, after=mark, limit=limit, item=job_record)

    def cancel_job(self, job_id: str, tenant: str | None) -> JobRecord:
        """Cancel a job that has not finished; a running job's worker stops it within seconds."""
        with write_transaction(self.engine) as conn:
            # PostgreSQL: wait for a concurrent claim or publish mark on the row, then read it.
            conn.execute(select(t.ft_jobs.c.seq).where(t.ft_jobs.c.id == job_id).with_for_update())
            job = self.get_job(job_id, tenant, conn=conn)
            if job.status in FINISHED:
                raise Conflict(
                    f"Job {job_id} has already {'been ' if job.status == CANCELLED else ''}{job.status}."
                )
            if job.publishing:
                raise Conflict(
                    f"Job {job_id} finished training and is publishing its result; it cannot be cancelled."
                )
            conn.execute(
                update(t.ft_jobs)
                .where(t.ft_jobs.c.id == job.id)
                .values(status=CANCELLED, finished_at=now(), lease_expires_at=None, estimated_finish=None)
            )
            self.add_event(job.id, "Job cancelled", data={"previous_status": job.status}, conn=conn)
        return self.get_job(job_id, tenant)

    def fail_validation(self, job_id: str, code: str, message: str, param: str | None) -> JobRecord:
        with write_transaction(self.engine) as conn:
            conn.execute(
                update(t.ft_jobs)
                .where(t.ft_jobs.c.id == job_id, t.ft_jobs.c.status == VALIDATING)
                .values(
                    status=FAILED,
                    error={"code": code, "message": message, "param": param},
                    finished_at=now(),
                )
            )
            self.add_event(job_id, message, level="error", conn=conn)
        return self.get_job(job_id, None)

    # -- events and checkpoints --------------------------------------------------------------

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
        estimated_finish: datetime | None = None,
        conn: Connection | None = None,
    ) -> None:
        """Append an event to a job's log (and move its estimated finish, when given)."""
        event = {"level": level, "type": type, "data": data, "estimated_finish": estimated_finish}
        if conn is not None:
            insert_event(conn, job_id, message, **event)
            return
        with write_transaction(self.engine) as own:
            insert_event(own, job_id, message, **event)

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> Page:
        """A job's events, newest first; ``after`` is the last event id of the previous page."""
        mark = parse_cursor(after, EVENT_PREFIX)
        query = select(t.ft_job_events).where(t.ft_job_events.c.job_id == job_id)
        with self.engine.connect() as conn:
            return fetch_page(conn, query, t.ft_job_events.c.id, after=mark, limit=limit, item=event_record)

    def list_checkpoints(self, job_id: str, *, after: str | None = None, limit: int = 10) -> Page:
        """A job's checkpoints, newest (highest step) first."""
        mark = parse_cursor(after, CHECKPOINT_PREFIX)
        query = select(t.ft_checkpoints).where(t.ft_checkpoints.c.job_id == job_id)
        with self.engine.connect() as conn:
            return fetch_page(
                conn, query, t.ft_checkpoints.c.id, after=mark, limit=limit, item=checkpoint_record
            )


# An ``ft:`` name never changes what it stands for, so a found one is kept (per database), for the
# most recently used names.
_RESOLVED: Lru[tuple[str, str], tuple[str, str]] = Lru(10_000)


def resolve_fine_tuned(registry: Registry, name: str, tenant: str | None) -> str:
    """The immutable ref (``tenant/ft-...@N``) behind a fine-tuned model or checkpoint name.

    ``tenant`` is the caller's tenant (None: an admin). Raises ``NotFound`` for an unknown name,
    a job that has not succeeded, and another tenant's model alike.
    """
    if tenant is not None and named_tenant(name) != tenant:
        # Another tenant's name (it says whose it is) is refused before any lookup or cache, so
        # it costs the same whether it exists or not: the answer's timing tells nothing.
        raise NotFound(f"no fine-tuned model {name}")
    key = (str(registry.engine.url), name)
    found = _RESOLVED.get(key)
    if found is None:
        with registry.engine.connect() as conn:
            row = conn.execute(
                select(t.ft_jobs.c.result_ref, t.tenants.c.name)
                .select_from(JOB_FROM)
                .where(t.ft_jobs.c.fine_tuned_model == name, t.ft_jobs.c.status == SUCCEEDED)
            ).first()
            if row is None:
                row = conn.execute(
                    select(t.ft_checkpoints.c.ref, t.tenants.c.name)
                    .select_from(
                        t.ft_checkpoints.join(t.ft_jobs, t.ft_jobs.c.id == t.ft_checkpoints.c.job_id).join(
                            t.tenants, t.tenants.c.id == t.ft_jobs.c.tenant_id
                        )
                    )
                    .where(t.ft_checkpoints.c.name == name)
                ).first()
        if row is not None:
            found = (row[0], row[1])
            _RESOLVED[key] = found
    if found is None or (tenant is not None and found[1] != tenant):
        raise NotFound(f"no fine-tuned model {name}")
    return found[0]
