"""Fine-tuning's rows as records: uploaded files, jobs, their events and checkpoints; and the
statements every part of ``FineTuning`` reads and writes them with."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, Table, select, update

import adapterdeck.registry.schema as t
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry.db import now
from adapterdeck.registry.errors import NotFound
from adapterdeck.registry.finetune.names import (
    CHECKPOINT_PREFIX,
    EVENT_PREFIX,
    RUNNING,
    adapter_name,
    fine_tuned_name,
)


@dataclass
class FileRecord:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    format: str | None
    examples: int | None
    created_at: datetime


@dataclass
class JobRecord:
    id: str
    tenant: str
    status: str
    model: str
    base: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    hyperparameters: dict[str, Any]
    adapter_method: dict[str, Any]
    objective: dict[str, Any] | None  # {"name": "dpo", "beta": 0.1}; None: sft
    parent: dict[str, str] | None  # {"model": "ft:...", "ref": "tenant/ft-...@N"}; None: the base
    integrations: list[dict[str, Any]] | None  # [{"type": "mlflow", "mlflow": {...}}]; None: none
    evaluators: list[str]
    user_metadata: dict[str, str] | None
    fine_tuned_model: str | None
    result_ref: str | None
    result_files: list[str]
    trained_tokens: int | None
    error: dict[str, Any] | None
    attempts: int
    max_attempts: int
    worker_id: str | None
    heartbeat_at: datetime | None
    lease_expires_at: datetime | None
    publishing: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    estimated_finish: datetime | None

    @property
    def planned_model_name(self) -> str:
        return fine_tuned_name(self.model, self.tenant, self.suffix, self.id)

    @property
    def adapter(self) -> str:
        return f"{self.tenant}/{adapter_name(self.suffix, self.id)}"


@dataclass
class EventRecord:
    id: int
    job_id: str
    level: str
    type: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime

    @property
    def public_id(self) -> str:
        return f"{EVENT_PREFIX}{self.id}"


@dataclass
class CheckpointRecord:
    id: int
    job_id: str
    step: int
    metrics: dict[str, Any]
    name: str
    ref: str
    created_at: datetime

    @property
    def public_id(self) -> str:
        return f"{CHECKPOINT_PREFIX}{self.id}"


@dataclass
class NewCheckpoint:
    """A checkpoint a worker published: its step, metrics and the registry version it became."""

    step: int
    metrics: dict[str, Any]
    ref: str


FILE_COLUMNS = (
    *(c for c in t.ft_files.c if c.name not in ("seq", "tenant_id")),
    t.tenants.c.name.label("tenant"),
)
FILE_FROM = t.ft_files.join(t.tenants, t.tenants.c.id == t.ft_files.c.tenant_id)
JOB_COLUMNS = (
    *(c for c in t.ft_jobs.c if c.name not in ("seq", "tenant_id")),
    t.tenants.c.name.label("tenant"),
)
JOB_FROM = t.ft_jobs.join(t.tenants, t.tenants.c.id == t.ft_jobs.c.tenant_id)


def file_record(row: Row) -> FileRecord:
    m = row._mapping
    return FileRecord(**{k: m[k] for k in FileRecord.__dataclass_fields__})


def job_record(row: Row) -> JobRecord:
    m = dict(row._mapping)
    m["publishing"] = bool(m["publishing"])
    return JobRecord(**{k: m[k] for k in JobRecord.__dataclass_fields__})


def parse_cursor(public_id: str | None, prefix: str) -> int | None:
    """The row number inside an event or checkpoint id (``ftevent-12``), or None for a bad one."""
    if public_id is None:
        return None
    number = public_id.removeprefix(prefix)
    if public_id == number or not (number.isascii() and number.isdigit()):
        raise AdapterdeckError(f"'after' must be an id from an earlier page, like {prefix}12")
    return int(number)


def event_record(row: Row) -> EventRecord:
    return EventRecord(**{k: row._mapping[k] for k in EventRecord.__dataclass_fields__})


def checkpoint_record(row: Row) -> CheckpointRecord:
    return CheckpointRecord(**{k: row._mapping[k] for k in CheckpointRecord.__dataclass_fields__})


def seq_of(
    conn: Connection, table: Table, public_id: str | None, tenant: str | None, missing: str
) -> int | None:
    """The row number of a file or job by id, as ``tenant`` sees them (another tenant's is unknown):
    where the page after it starts."""
    if public_id is None:
        return None
    query = (
        select(table.c.seq)
        .select_from(table.join(t.tenants, t.tenants.c.id == table.c.tenant_id))
        .where(table.c.id == public_id)
    )
    if tenant is not None:
        query = query.where(t.tenants.c.name == tenant)
    mark = conn.execute(query).scalar()
    if mark is None:
        raise NotFound(f"{missing}: {public_id}")
    return mark


def select_job(conn: Connection, job_id: str, tenant: str | None) -> JobRecord:
    query = select(*JOB_COLUMNS).select_from(JOB_FROM).where(t.ft_jobs.c.id == job_id)
    if tenant is not None:
        query = query.where(t.tenants.c.name == tenant)
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"No such fine-tuning job: {job_id}")
    return job_record(row)


def insert_event(
    conn: Connection,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    estimated_finish: datetime | None = None,
) -> None:
    """Append an event to a job's log (and move its estimated finish, when given)."""
    conn.execute(
        t.ft_job_events.insert().values(
            job_id=job_id, level=level, type=type, message=message, data=data, created_at=now()
        )
    )
    if estimated_finish is not None:
        conn.execute(
            update(t.ft_jobs)
            .where(t.ft_jobs.c.id == job_id, t.ft_jobs.c.status == RUNNING)
            .values(estimated_finish=estimated_finish)
        )
