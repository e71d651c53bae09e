"""Fine-tuning jobs in the registry database: uploaded files, jobs, their events and checkpoints.

The HTTP API (``serve/finetune.py``) records files and jobs here; workers (``serve/worker.py``)
claim queued jobs, hold them with a lease they renew by heartbeating, and finish them. Claiming is
safe with many workers on many machines: on PostgreSQL the queued row is taken with
``SELECT ... FOR UPDATE SKIP LOCKED`` (a second worker skips it and takes the next one), on SQLite
the claim runs in a ``BEGIN IMMEDIATE`` transaction (one writer at a time). A job whose lease ran
out (its worker died or lost the database) is requeued while it has attempts left, else failed;
any worker's sweep and the gateway's reads find such jobs.

A cancelled job's status changes here at once; the worker notices at its next heartbeat (the
heartbeat only renews a job that is still running and still its own) and stops the training.
Once a worker starts publishing a result (``publishing``), a cancel is refused instead.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import string
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from sqlalchemy import Connection, Row, and_, func, select, update

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry import schema as t
from adapterdeck.registry.db import write_transaction
from adapterdeck.registry.private import make_private, private_dir
from adapterdeck.registry.registry import Conflict, NotFound, Registry, _insert_ignore
from adapterdeck.registry.store import sha256_file

VALIDATING, QUEUED, RUNNING = "validating_files", "queued", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
ACTIVE = (VALIDATING, QUEUED, RUNNING)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
PURPOSE_TRAINING, PURPOSE_RESULTS = "fine-tune", "fine-tune-results"
FILE_PREFIX, JOB_PREFIX, EVENT_PREFIX, CHECKPOINT_PREFIX = "file-", "ftjob-", "ftevent-", "ftckpt-"
# A job left in validating_files this long (its gateway died mid-request) is failed by the sweep.
VALIDATION_TIMEOUT = timedelta(minutes=5)
_ALPHABET = string.ascii_lowercase + string.digits


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    """A stored time with its UTC offset (SQLite hands it back without one)."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def epoch(value: datetime | None) -> int | None:
    """Unix seconds, as the OpenAI API gives times."""
    stamped = _utc(value)
    return int(stamped.timestamp()) if stamped is not None else None


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def short_id(job_id: str) -> str:
    """The part of a job id that names its fine-tuned model (``ft:...:<short>``)."""
    return job_id.removeprefix(JOB_PREFIX)[:8]


def fine_tuned_name(model: str, tenant: str, suffix: str | None, job_id: str) -> str:
    """The OpenAI-style name of a job's result: ``ft:BASE:TENANT:SUFFIX:ID`` (SUFFIX may be empty)."""
    return f"ft:{model}:{tenant}:{suffix or ''}:{short_id(job_id)}"


def adapter_name(suffix: str | None, job_id: str) -> str:
    """The registry adapter (``tenant/<this>``) a job publishes its result and checkpoints to."""
    middle = f"{suffix.lower()}-" if suffix else ""
    return f"ft-{middle}{short_id(job_id)}"


class FileStore:
    """Uploaded files by id, under ``<storage>/finetune/files/`` (apart from the adapter blobs, so
    ``registry gc`` never sees them). Local writes go to a temporary name renamed into place, mode
    0600 in directories of mode 0700."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise AdapterdeckError(f"cannot use storage {url!r}: {exc}") from exc
        self.url = url
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, file_id: str) -> str:
        return f"{self.root}/{file_id}"

    def put_file(self, file_id: str, local: str | Path) -> None:
        target = self.path(file_id)
        if not self.local:
            self.fs.put_file(str(local), target)
            return
        private_dir(Path(target).parent)
        tmp = f"{target}.{uuid.uuid4().hex}.tmp"
        self.fs.put_file(str(local), tmp)
        make_private(tmp)
        os.replace(tmp, target)

    def put_bytes(self, file_id: str, data: bytes) -> None:
        target = self.path(file_id)
        if not self.local:
            self.fs.pipe_file(target, data)
            return
        private_dir(Path(target).parent)
        tmp = f"{target}.{uuid.uuid4().hex}.tmp"
        Path(tmp).write_bytes(data)
        make_private(tmp)
        os.replace(tmp, target)

    def read(self, file_id: str, sha256: str) -> bytes:
        try:
            data = self.fs.cat_file(self.path(file_id))
        except FileNotFoundError:
            raise AdapterdeckError(f"the content of {file_id} is missing from {self.url}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise AdapterdeckError(f"the content of {file_id} is corrupt in {self.url}")
        return data

    def delete(self, file_id: str) -> None:
        try:
            self.fs.rm_file(self.path(file_id))
        except FileNotFoundError:
            pass


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


@dataclass
class Page:
    items: list[Any]
    has_more: bool
    extra: dict[str, Any] = field(default_factory=dict)


_FILE_COLUMNS = (
    *(c for c in t.ft_files.c if c.name not in ("seq", "tenant_id")),
    t.tenants.c.name.label("tenant"),
)
_FILE_FROM = t.ft_files.join(t.tenants, t.tenants.c.id == t.ft_files.c.tenant_id)
_JOB_COLUMNS = (
    *(c for c in t.ft_jobs.c if c.name not in ("seq", "tenant_id")),
    t.tenants.c.name.label("tenant"),
)
_JOB_FROM = t.ft_jobs.join(t.tenants, t.tenants.c.id == t.ft_jobs.c.tenant_id)


def _file(row: Row) -> FileRecord:
    m = row._mapping
    return FileRecord(**{k: m[k] for k in FileRecord.__dataclass_fields__})


def _job(row: Row) -> JobRecord:
    m = dict(row._mapping)
    m["publishing"] = bool(m["publishing"])
    return JobRecord(**{k: m[k] for k in JobRecord.__dataclass_fields__})


def _cursor(public_id: str | None, prefix: str) -> int | None:
    """The row number inside an event or checkpoint id (``ftevent-12``), or None for a bad one."""
    if public_id is None:
        return None
    number = public_id.removeprefix(prefix)
    if public_id == number or not (number.isascii() and number.isdigit()):
        raise AdapterdeckError(f"'after' must be an id from an earlier page, like {prefix}12")
    return int(number)


class FineTuning:
    """Files, jobs, events and checkpoints of fine-tuning, on a ``Registry``'s database and storage.

    ``tenant`` arguments scope reads and changes to one tenant; None means every tenant (an admin).
    Another tenant's file or job is reported exactly like a missing one.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.engine = registry.engine
        storage = registry.settings.resolved_storage_url().rstrip("/")
        self.files = FileStore(f"{storage}/finetune/files", registry.settings.storage_options)

    # -- files -------------------------------------------------------------------------------

    def _tenant_id(self, conn: Connection, tenant: str) -> int:
        _insert_ignore(conn, t.tenants, {"name": tenant, "created_at": _now()}, ["name"])
        return conn.execute(select(t.tenants.c.id).where(t.tenants.c.name == tenant)).scalar_one()

    def add_file(
        self,
        tenant: str,
        filename: str,
        purpose: str,
        *,
        path: str | Path | None = None,
        data: bytes | None = None,
        format: str | None = None,
        examples: int | None = None,
    ) -> FileRecord:
        """Store a file (from ``path`` or ``data``) for ``tenant``; it is listed once it is stored."""
        if (path is None) == (data is None):
            raise ValueError("give exactly one of path and data")
        file_id = new_id(FILE_PREFIX)
        if path is not None:
            size = Path(path).stat().st_size
            digest = sha256_file(path)
            self.files.put_file(file_id, path)
        else:
            assert data is not None
            size, digest = len(data), hashlib.sha256(data).hexdigest()
            self.files.put_bytes(file_id, data)
        try:
            with write_transaction(self.engine) as conn:
                conn.execute(
                    t.ft_files.insert().values(
                        id=file_id,
                        tenant_id=self._tenant_id(conn, tenant),
                        filename=filename,
                        purpose=purpose,
                        bytes=size,
                        sha256=digest,
                        format=format,
                        examples=examples,
                        created_at=_now(),
                    )
                )
        except BaseException:
            self.files.delete(file_id)
            raise
        return self.get_file(file_id, tenant)

    def get_file(self, file_id: str, tenant: str | None) -> FileRecord:
        query = select(*_FILE_COLUMNS).select_from(_FILE_FROM).where(t.ft_files.c.id == file_id)
        if tenant is not None:
            query = query.where(t.tenants.c.name == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"No such file: {file_id}")
        return _file(row)

    def list_files(
        self,
        tenant: str | None,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: str = "desc",
    ) -> Page:
        query = select(*_FILE_COLUMNS).select_from(_FILE_FROM)
        if tenant is not None:
            query = query.where(t.tenants.c.name == tenant)
        if purpose is not None:
            query = query.where(t.ft_files.c.purpose == purpose)
        seq = t.ft_files.c.seq
        with self.engine.connect() as conn:
            if after is not None:
                # The cursor is looked up as the caller sees files: another tenant's is unknown.
                cursor = select(seq).select_from(_FILE_FROM).where(t.ft_files.c.id == after)
                if tenant is not None:
                    cursor = cursor.where(t.tenants.c.name == tenant)
                mark = conn.execute(cursor).scalar()
                if mark is None:
                    raise NotFound(f"No such file: {after}")
                query = query.where(seq < mark if order == "desc" else seq > mark)
            query = query.order_by(seq.desc() if order == "desc" else seq).limit(limit + 1)
            rows = conn.execute(query).all()
        return Page([_file(r) for r in rows[:limit]], len(rows) > limit)

    def file_content(self, record: FileRecord) -> bytes:
        return self.files.read(record.id, record.sha256)

    def delete_file(self, file_id: str, tenant: str | None) -> None:
        record = self.get_file(file_id, tenant)
        with write_transaction(self.engine) as conn:
            conn.execute(t.ft_files.delete().where(t.ft_files.c.id == record.id))
        self.files.delete(record.id)

    # -- jobs --------------------------------------------------------------------------------

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
    ) -> JobRecord:
        """Record a job in ``validating_files``; ``files_validated`` or ``fail`` moves it on."""
        job_id = new_id(JOB_PREFIX)
        now = _now()
        with write_transaction(self.engine) as conn:
            conn.execute(
                t.ft_jobs.insert().values(
                    id=job_id,
                    tenant_id=self._tenant_id(conn, tenant),
                    status=VALIDATING,
                    model=model,
                    base=base,
                    training_file=training_file,
                    validation_file=validation_file,
                    suffix=suffix,
                    seed=seed,
                    hyperparameters=hyperparameters,
                    adapter_method=adapter_method,
                    evaluators=evaluators,
                    user_metadata=metadata,
                    result_files=[],
                    attempts=0,
                    max_attempts=max_attempts,
                    publishing=0,
                    created_at=now,
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
        query = select(*_JOB_COLUMNS).select_from(_JOB_FROM).where(t.ft_jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(t.tenants.c.name == tenant)
        if conn is None:
            with self.engine.connect() as own:
                row = own.execute(query).first()
        else:
            row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"No such fine-tuning job: {job_id}")
        return _job(row)

    def list_jobs(self, tenant: str | None, *, after: str | None = None, limit: int = 20) -> Page:
        """Jobs, newest first; ``after`` is the last job id of the previous page."""
        seq = t.ft_jobs.c.seq
        query = select(*_JOB_COLUMNS).select_from(_JOB_FROM)
        if tenant is not None:
            query = query.where(t.tenants.c.name == tenant)
        with self.engine.connect() as conn:
            if after is not None:
                cursor = select(seq).select_from(_JOB_FROM).where(t.ft_jobs.c.id == after)
                if tenant is not None:
                    cursor = cursor.where(t.tenants.c.name == tenant)
                mark = conn.execute(cursor).scalar()
                if mark is None:
                    raise NotFound(f"No such fine-tuning job: {after}")
                query = query.where(seq < mark)
            rows = conn.execute(query.order_by(seq.desc()).limit(limit + 1)).all()
        return Page([_job(r) for r in rows[:limit]], len(rows) > limit)

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
                .values(status=CANCELLED, finished_at=_now(), lease_expires_at=None, estimated_finish=None)
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
                    finished_at=_now(),
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
        if conn is None:
            with write_transaction(self.engine) as own:
                self.add_event(
                    job_id,
                    message,
                    level=level,
                    type=type,
                    data=data,
                    estimated_finish=estimated_finish,
                    conn=own,
                )
            return
        conn.execute(
            t.ft_job_events.insert().values(
                job_id=job_id, level=level, type=type, message=message, data=data, created_at=_now()
            )
        )
        if estimated_finish is not None:
            conn.execute(
                update(t.ft_jobs)
                .where(t.ft_jobs.c.id == job_id, t.ft_jobs.c.status == RUNNING)
                .values(estimated_finish=estimated_finish)
            )

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> Page:
        """A job's events, newest first; ``after`` is the last event id of the previous page."""
        mark = _cursor(after, EVENT_PREFIX)
        e = t.ft_job_events
        query = select(e).where(e.c.job_id == job_id)
        if mark is not None:
            query = query.where(e.c.id < mark)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(e.c.id.desc()).limit(limit + 1)).all()
        events = [EventRecord(**{k: r._mapping[k] for k in EventRecord.__dataclass_fields__}) for r in rows]
        return Page(events[:limit], len(rows) > limit)

    def list_checkpoints(self, job_id: str, *, after: str | None = None, limit: int = 10) -> Page:
        """A job's checkpoints, newest (highest step) first."""
        mark = _cursor(after, CHECKPOINT_PREFIX)
        c = t.ft_checkpoints
        query = select(c).where(c.c.job_id == job_id)
        if mark is not None:
            query = query.where(c.c.id < mark)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(c.c.id.desc()).limit(limit + 1)).all()
        found = [
            CheckpointRecord(**{k: r._mapping[k] for k in CheckpointRecord.__dataclass_fields__})
            for r in rows
        ]
        return Page(found[:limit], len(rows) > limit)

    # -- workers -----------------------------------------------------------------------------

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
        now = _now()
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
                    heartbeat_at=now,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    started_at=func.coalesce(t.ft_jobs.c.started_at, now),
                    publishing=0,
                )
            )
            job_id = conn.execute(select(t.ft_jobs.c.id).where(t.ft_jobs.c.seq == seq)).scalar_one()
            return self.get_job(job_id, None, conn=conn)

    def _mine(self, job_id: str, worker_id: str) -> Any:
        return and_(
            t.ft_jobs.c.id == job_id, t.ft_jobs.c.worker_id == worker_id, t.ft_jobs.c.status == RUNNING
        )

    def heartbeat(self, job_id: str, worker_id: str, lease_seconds: float) -> bool:
        """Renew the lease; False when the job is no longer this worker's running job (cancelled, or
        taken back after the lease ran out): the worker must stop it."""
        now = _now()
        with write_transaction(self.engine) as conn:
            return bool(
                conn.execute(
                    update(t.ft_jobs)
                    .where(self._mine(job_id, worker_id))
                    .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
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
        now = _now()
        with write_transaction(self.engine) as conn:
            return bool(
                conn.execute(
                    update(t.ft_jobs)
                    .where(self._mine(job_id, worker_id))
                    .values(
                        publishing=1,
                        heartbeat_at=now,
                        lease_expires_at=now + timedelta(seconds=lease_seconds),
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
        now = _now()
        with write_transaction(self.engine) as conn:
            job = self.get_job(job_id, None, conn=conn)
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
                    finished_at=now,
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
                        created_at=now,
                    )
                )
            self.add_event(
                job_id,
                "The job has successfully completed",
                data={"fine_tuned_model": name, "ref": ref},
                conn=conn,
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
                    finished_at=_now(),
                    estimated_finish=None,
                    lease_expires_at=None,
                )
            ).rowcount
            if changed:
                self.add_event(job_id, f"The job failed: {message}", level="error", conn=conn)
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
                self.add_event(job_id, f"{reason}; the job is back in the queue", level="warn", conn=conn)
        return bool(changed)

    def sweep(self) -> list[tuple[str, str]]:
        """Requeue (or fail, with no attempts left) running jobs whose lease ran out, and fail jobs
        stuck in validation. Returns ``(job id, new status)`` for each; cheap when there are none."""
        now = _now()
        running_stale = and_(t.ft_jobs.c.status == RUNNING, t.ft_jobs.c.lease_expires_at < now)
        validating_stale = and_(
            t.ft_jobs.c.status == VALIDATING, t.ft_jobs.c.created_at < now - VALIDATION_TIMEOUT
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
                        "finished_at": now,
                    }
                    level = "error"
                elif row.attempts < row.max_attempts:
                    message = (
                        f"Worker {row.worker_id} stopped heartbeating (last at {_utc(row.heartbeat_at)}); "
                        f"job requeued after attempt {row.attempts} of {row.max_attempts}"
                    )
                    values = {"status": QUEUED, "worker_id": None, "heartbeat_at": None, "publishing": 0}
                    level = "warn"
                else:
                    message = (
                        f"Worker {row.worker_id} stopped heartbeating (last at {_utc(row.heartbeat_at)}) "
                        f"on the last of {row.max_attempts} attempts"
                    )
                    values = {
                        "status": FAILED,
                        "error": {"code": "worker_lost", "message": message, "param": None},
                        "finished_at": now,
                    }
                    level = "error"
                values.update(lease_expires_at=None, estimated_finish=None)
                conn.execute(
                    update(t.ft_jobs)
                    .where(t.ft_jobs.c.id == row.id, t.ft_jobs.c.status == row.status)
                    .values(**values)
                )
                self.add_event(row.id, message, level=level, data={"worker": row.worker_id}, conn=conn)
                changed.append((row.id, values["status"]))
        return changed

    # -- fine-tuned models -------------------------------------------------------------------

    def models(self, tenant: str | None) -> list[tuple[str, str, datetime]]:
        """``(name, tenant, created)`` of every fine-tuned model and checkpoint of ``tenant`` (or all)."""
        jobs = (
            select(t.ft_jobs.c.id, t.ft_jobs.c.fine_tuned_model, t.tenants.c.name, t.ft_jobs.c.finished_at)
            .select_from(_JOB_FROM)
            .where(t.ft_jobs.c.status == SUCCEEDED)
            .order_by(t.ft_jobs.c.seq)
        )
        if tenant is not None:
            jobs = jobs.where(t.tenants.c.name == tenant)
        out: list[tuple[str, str, datetime]] = []
        with self.engine.connect() as conn:
            rows = conn.execute(jobs).all()
            checkpoints = conn.execute(
                select(t.ft_checkpoints.c.job_id, t.ft_checkpoints.c.name, t.ft_checkpoints.c.created_at)
                .where(t.ft_checkpoints.c.job_id.in_([r.id for r in rows]))
                .order_by(t.ft_checkpoints.c.step)
            ).all()
        by_job: dict[str, list[Row]] = {}
        for c in checkpoints:
            by_job.setdefault(c.job_id, []).append(c)
        for r in rows:
            out.append((r.fine_tuned_model, r.name, _utc(r.finished_at) or _now()))
            out += [(c.name, r.name, _utc(c.created_at) or _now()) for c in by_job.get(r.id, [])]
        return out


# An ``ft:`` name never changes what it stands for, so a found one is kept (per database).
_RESOLVED: dict[tuple[str, str], tuple[str, str]] = {}


def _named_tenant(name: str) -> str | None:
    """The tenant a fine-tuned model name names: ``ft:BASE:TENANT:SUFFIX:ID[:ckpt-step-N]``."""
    parts = name.split(":")
    if parts and parts[-1].startswith("ckpt-step-"):
        parts = parts[:-1]
    return parts[-3] if len(parts) >= 5 and parts[0] == "ft" else None


def resolve_fine_tuned(registry: Registry, name: str, tenant: str | None) -> str:
    """The immutable ref (``tenant/ft-...@N``) behind a fine-tuned model or checkpoint name.

    ``tenant`` is the caller's tenant (None: an admin). Raises ``NotFound`` for an unknown name,
    a job that has not succeeded, and another tenant's model alike.
    """
    if tenant is not None and _named_tenant(name) != tenant:
        # Another tenant's name (it says whose it is) is refused before any lookup or cache, so
        # it costs the same whether it exists or not: the answer's timing tells nothing.
        raise NotFound(f"no fine-tuned model {name}")
    key = (str(registry.engine.url), name)
    found = _RESOLVED.get(key)
    if found is None:
        with registry.engine.connect() as conn:
            row = conn.execute(
                select(t.ft_jobs.c.result_ref, t.tenants.c.name)
                .select_from(_JOB_FROM)
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
            if len(_RESOLVED) > 10_000:
                _RESOLVED.clear()
            _RESOLVED[key] = found
    if found is None or (tenant is not None and found[1] != tenant):
        raise NotFound(f"no fine-tuned model {name}")
    return found[0]
