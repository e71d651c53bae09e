"""The OpenAI fine-tuning API: ``/v1/files`` and ``/v1/fine_tuning/jobs``, scoped to the caller's tenant.

A training file is validated when it is uploaded, with the checks of ``adapterdeck data validate
--base`` (the served base's tokenizer and context length); a bad file is refused with every bad
line by number. A job names the served base as its ``model``, or one of the tenant's own
fine-tuned models to continue tuning it, and is checked as a run config (``spec.py``) before it
is queued; workers (``worker.py``) run it. Another tenant's file, job or fine-tuned model gets
the same 404 as a missing one. An admin key reads, cancels and deletes everyone's, but only a
tenant creates files and jobs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import tempfile
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import Response

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.plugins.trackers import shown
from adapterdeck.registry import Conflict, NotFound, Registry
from adapterdeck.registry.finetune import (
    PURPOSE_TRAINING,
    FileRecord,
    FineTuning,
    JobRecord,
    resolve_fine_tuned,
)
from adapterdeck.registry.tenants import Principal
from adapterdeck.serve.auth import Caller, tenant_only
from adapterdeck.serve.errors import ApiError, api_error, bad_request, model_not_found
from adapterdeck.serve.finetune.objects import (
    DpoHyperparameters,
    Hyperparameters,
    Integration,
    JobCreate,
    checkpoint_object,
    event_object,
    file_object,
    job_object,
    page_object,
)
from adapterdeck.serve.finetune.spec import MIN_TRAINING_EXAMPLES, check_job_config
from adapterdeck.serve.settings import ServeSettings

logger = logging.getLogger("adapterdeck.serve")
router = APIRouter()
CHUNK = 1 << 20
SHOWN_ERRORS = 50
# The integration types a job may have: the trackers a job is logged to (``log`` in its run config).
INTEGRATIONS = ("mlflow",)


# -- helpers ------------------------------------------------------------------------------------


_OPEN: weakref.WeakKeyDictionary[Registry, FineTuning] = weakref.WeakKeyDictionary()


def _fine_tuning(registry: Registry) -> FineTuning:
    if registry not in _OPEN:
        _OPEN[registry] = FineTuning(registry)
    return _OPEN[registry]


def _state(request: Request) -> tuple[ServeSettings, FineTuning]:
    return request.app.state.settings, _fine_tuning(request.app.state.registry)


def _scope(who: Principal) -> str | None:
    return None if who.is_admin else who.tenant


def _not_found(kind: str, object_id: str, param: str) -> ApiError:
    return ApiError(
        404, f"No such {kind}: {object_id}", "invalid_request_error", code="not_found", param=param
    )


def _limit(value: int) -> int:
    if not 1 <= value <= 100:
        raise bad_request("'limit' must be between 1 and 100.", "limit")
    return value


@lru_cache(maxsize=4)
def _token_limits(base: str) -> tuple[Any, int | None]:
    """The base's token counter and context length: uploads are checked as ``data validate --base``."""
    from adapterdeck.core.basemodel import context_length, load_tokenizer, token_counter

    return token_counter(load_tokenizer(base)), context_length(base)


def _validate_upload(path: Path, filename: str, base: str) -> tuple[str | None, int]:
    """Validate an uploaded file like ``adapterdeck data validate --base``; every bad line is named."""
    from adapterdeck.core.dataset import validate_file

    try:
        counter, limit = _token_limits(base)
    except AdapterdeckError as exc:  # a hub base that cannot be loaded here: check all but the lengths
        logger.warning("uploads are validated without token counts: %s", exc)
        counter, limit = None, None
    report = validate_file(path, token_counter=counter, max_tokens=limit)
    if not report.ok:
        shown = "\n".join(f"  {e}" for e in report.errors[:SHOWN_ERRORS])
        more = len(report.errors) - SHOWN_ERRORS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise ApiError(
            400,
            f"{filename}: {len(report.errors)} bad line(s); fix them and upload again:\n{shown}{tail}",
            "invalid_request_error",
            code="invalid_file",
            param="file",
        )
    return report.format, len(report.examples)


# -- files --------------------------------------------------------------------------------------


@router.post("/v1/files")
async def create_file(
    request: Request, who: Caller, file: UploadFile, purpose: Annotated[str, Form()]
) -> dict[str, Any]:
    settings, jobs = _state(request)
    tenant = tenant_only(who, "Files")
    if purpose != PURPOSE_TRAINING:
        raise bad_request(f"purpose {purpose!r} is not supported here; use 'fine-tune'.", "purpose")
    limit = settings.finetune.max_file_bytes
    filename = Path(file.filename or "").name or "upload.jsonl"
    with tempfile.TemporaryDirectory(prefix="adapterdeck-upload-") as tmp:
        path = Path(tmp) / "upload.jsonl"
        size = 0
        with path.open("wb") as out:
            while chunk := await file.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ApiError(
                        413,
                        f"{filename} is larger than the limit of {limit:,} bytes.",
                        "invalid_request_error",
                        code="file_too_large",
                        param="file",
                    )
                out.write(chunk)
        fmt, examples = await asyncio.to_thread(_validate_upload, path, filename, settings.base)
        record = await asyncio.to_thread(
            jobs.add_file, tenant, filename, purpose, path=path, format=fmt, examples=examples
        )
    return file_object(record)


@router.get("/v1/files")
async def list_files(
    request: Request,
    who: Caller,
    purpose: str | None = None,
    limit: int = 10000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    _, jobs = _state(request)
    if not 1 <= limit <= 10000:
        raise bad_request("'limit' must be between 1 and 10000.", "limit")
    try:
        page = await asyncio.to_thread(
            jobs.list_files, _scope(who), purpose=purpose, after=after, limit=limit, order=order
        )
    except NotFound:
        raise _not_found("file", after or "", "after") from None
    return page_object([file_object(r) for r in page.items], page.has_more, ids=True)


async def _file(request: Request, who: Principal, file_id: str) -> FileRecord:
    _, jobs = _state(request)
    try:
        return await asyncio.to_thread(jobs.get_file, file_id, _scope(who))
    except NotFound:
        raise _not_found("file", file_id, "file_id") from None


@router.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, who: Caller, file_id: str) -> dict[str, Any]:
    return file_object(await _file(request, who, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, who: Caller, file_id: str) -> Response:
    record = await _file(request, who, file_id)
    _, jobs = _state(request)
    data = await asyncio.to_thread(jobs.file_content, record)
    media = "text/csv" if record.filename.endswith(".csv") else "application/octet-stream"
    return Response(data, media_type=media)


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, who: Caller, file_id: str) -> dict[str, Any]:
    record = await _file(request, who, file_id)
    _, jobs = _state(request)
    await asyncio.to_thread(jobs.delete_file, record.id, _scope(who))
    return {"id": record.id, "object": "file", "deleted": True}


# -- jobs ---------------------------------------------------------------------------------------


def _training_file(jobs: FineTuning, tenant: str, file_id: str, param: str) -> FileRecord:
    try:
        record = jobs.get_file(file_id, tenant)
    except NotFound:
        raise bad_request(f"invalid {param}: no file {file_id}", param) from None
    if record.purpose != PURPOSE_TRAINING:
        raise bad_request(
            f"invalid {param}: {file_id} has purpose {record.purpose!r}, not 'fine-tune'", param
        )
    return record


def _validation(jobs: FineTuning, tenant: str, body: JobCreate) -> FileRecord | None:
    if body.validation_file is None:
        return None
    return _training_file(jobs, tenant, body.validation_file, "validation_file")


def _check_kind(record: FileRecord, objective: dict[str, Any] | None, param: str) -> None:
    """A DPO job takes preference pairs, a supervised one conversations: refused at creation."""
    from adapterdeck.core.plugins import catalog

    plugins = catalog()
    wanted = plugins.objective((objective or {}).get("name", "sft")).data_kinds
    kind = plugins.formats[record.format].obj.kind if record.format in plugins.formats else None
    if kind is not None and kind not in wanted:
        method = "dpo" if objective else "supervised"
        raise bad_request(
            f"invalid {param}: {record.id} is in the {record.format} format ({kind}); a {method} job "
            f"trains on {' or '.join(wanted)}" + (" (the preference format)" if method == "dpo" else ""),
            param,
        )


@lru_cache(maxsize=4)
def _base_fingerprint(base: str) -> str:
    from adapterdeck.core.basemodel import fingerprint

    return fingerprint(base)


def _parent(
    settings: ServeSettings, jobs: FineTuning, tenant: str, body: JobCreate
) -> tuple[dict[str, str] | None, str]:
    """The fine-tuned model a job continues (``model="ft:..."``, the caller's own only: another
    tenant's is a 404 like a missing one), checked against the served base; and the job's method
    (a continued job's is its parent's)."""
    if body.model in (settings.base_name(), settings.base):
        return None, body.adapterdeck.method
    if not body.model.startswith("ft:"):
        raise model_not_found(body.model)
    try:
        info = jobs.registry.resolve(resolve_fine_tuned(jobs.registry, body.model, tenant))
    except NotFound:
        raise model_not_found(body.model) from None
    if info.base_fingerprint != _base_fingerprint(settings.base):
        raise bad_request(
            f"{body.model} was tuned on base {info.base!r}, not on the served base {settings.base_name()!r}",
            "model",
        )
    asked = body.adapterdeck.method if "method" in body.adapterdeck.model_fields_set else info.method
    if asked != info.method:
        raise bad_request(
            f"{body.model} is a {info.method} adapter; a job that continues it trains {info.method}, "
            f"not {asked}",
            "adapterdeck.method",
        )
    return {"model": body.model, "ref": info.ref}, info.method


def _integrations(settings: ServeSettings, given: list[Integration]) -> list[dict[str, Any]]:
    """OpenAI's integrations as the job keeps them: each checked (an ``mlflow`` one logs to a tracking
    URI of ``finetune.mlflow_tracking_uris``, the first when it names none); any other type is a 400."""
    from pydantic import ValidationError

    from adapterdeck.core.plugins import catalog

    kept: list[dict[str, Any]] = []
    for i, integration in enumerate(given):
        where, kind = f"integrations.{i}", integration.type
        if kind == "wandb":
            raise bad_request(
                "Weights & Biases (type 'wandb') is not supported here: this server reaches no hosted "
                'service. Log the job to an MLflow tracking server: {"type": "mlflow", "mlflow": '
                '{"tracking_uri": ..., "experiment": ...}}.',
                f"{where}.type",
            )
        if kind not in INTEGRATIONS:
            raise bad_request(
                f"unknown integration type {kind!r}; supported: {', '.join(INTEGRATIONS)}", f"{where}.type"
            )
        if any(k["type"] == kind for k in kept):
            raise bad_request(f"more than one integration of type {kind!r}", f"{where}.type")
        extra = sorted(set(integration.model_extra or {}) - {kind})
        if extra:
            raise bad_request(f"unknown key {extra[0]!r} in an integration of type {kind!r}", where)
        options = (integration.model_extra or {}).get(kind) or {}
        if not isinstance(options, dict):
            raise bad_request(f"expected an object of the {kind} integration's settings", f"{where}.{kind}")
        if kind == "mlflow":
            options = _mlflow_options(settings, options, f"{where}.{kind}")
        try:
            catalog().tracker(kind).params.model_validate(options)
        except ValidationError as exc:
            error = exc.errors()[0]
            param = ".".join([where, kind, *map(str, error["loc"])])
            raise bad_request(f"{param}: {error['msg']}", param) from None
        kept.append({"type": kind, kind: options})
    return kept


def _mlflow_options(settings: ServeSettings, options: dict[str, Any], where: str) -> dict[str, Any]:
    """An mlflow integration's settings with its tracking URI: one the operator listed, never a
    store on the worker's disk chosen by a tenant, nor an artifact location there."""
    allowed = settings.finetune.mlflow_tracking_uris
    if not allowed:
        raise bad_request(
            "this server takes no mlflow integration: its operator lists the tracking URIs jobs may "
            "log to in finetune.mlflow_tracking_uris",
            where,
        )
    if "artifact_location" in options:
        raise bad_request(
            "artifact_location cannot be set through the API: a new experiment keeps its artifacts "
            "where its tracking server puts them",
            f"{where}.artifact_location",
        )
    uri = options.get("tracking_uri")
    if uri is None:
        return {"tracking_uri": allowed[0], **options}
    if not isinstance(uri, str) or uri.rstrip("/") not in {a.rstrip("/") for a in allowed}:
        raise bad_request(
            f"tracking_uri {shown(str(uri))!r} is not one this server logs to; it logs to: "
            + ", ".join(shown(a) for a in allowed),
            f"{where}.tracking_uri",
        )
    return options


def _create_job(settings: ServeSettings, jobs: FineTuning, tenant: str, body: JobCreate) -> JobRecord:
    base_name = settings.base_name()
    parent, method = _parent(settings, jobs, tenant, body)
    integrations = _integrations(settings, body.integrations or [])
    if body.method is not None and body.hyperparameters is not None:
        raise bad_request(
            f"give the hyperparameters in method.{body.method.type}, not also at the top level.",
            "hyperparameters",
        )
    hyper: Hyperparameters = body.hyperparameters or Hyperparameters()
    objective: dict[str, Any] | None = None
    if body.method is not None and body.method.type == "dpo":
        hyper = body.method.dpo.hyperparameters if body.method.dpo else DpoHyperparameters()
        objective = {"name": "dpo"}
    elif body.method is not None and body.method.supervised is not None:
        hyper = body.method.supervised.hyperparameters
    training = _training_file(jobs, tenant, body.training_file, "training_file")
    for record, param in ((training, "training_file"), (_validation(jobs, tenant, body), "validation_file")):
        if record is not None:
            _check_kind(record, objective, param)
    if (training.examples or 0) < MIN_TRAINING_EXAMPLES:
        raise bad_request(
            f"invalid training_file: {training.id} has {training.examples} example(s); "
            f"at least {MIN_TRAINING_EXAMPLES} are needed",
            "training_file",
        )
    options = body.adapterdeck
    adapter_method = {"name": method, **options.params}
    hyperparameters = hyper.model_dump()
    try:
        check_job_config(
            base=settings.base,
            adapter_method=adapter_method,
            evaluators=options.evaluators,
            hyperparameters=hyperparameters,
            objective=objective,
            integrations=integrations,
        )
    except AdapterdeckError as exc:
        raise bad_request(str(exc), "adapterdeck") from None
    job = jobs.create_job(
        tenant,
        model=base_name,
        base=settings.base,
        training_file=training.id,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else random.randrange(2**31),
        hyperparameters=hyperparameters,
        adapter_method=adapter_method,
        objective=objective,
        parent=parent,
        integrations=integrations,
        evaluators=options.evaluators,
        metadata=body.metadata,
        max_attempts=settings.finetune.max_attempts,
    )
    # The files were validated line by line at upload; here they must still be there, whole.
    for file_id in filter(None, (job.training_file, job.validation_file)):
        try:
            jobs.file_content(jobs.get_file(file_id, tenant))
        except (NotFound, AdapterdeckError) as exc:
            param = "training_file" if file_id == job.training_file else "validation_file"
            return jobs.fail_validation(job.id, f"invalid_{param}", f"{file_id}: {exc}", param)
    return jobs.files_validated(job.id, {"training_examples": training.examples})


@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request, who: Caller, body: JobCreate) -> dict[str, Any]:
    settings, jobs = _state(request)
    tenant = tenant_only(who, "Fine-tuning jobs")
    return job_object(await asyncio.to_thread(_create_job, settings, jobs, tenant, body))


def _get_job(jobs: FineTuning, who: Principal, job_id: str) -> JobRecord:
    jobs.sweep()  # a dead worker's job shows as requeued or failed, never as running
    try:
        return jobs.get_job(job_id, _scope(who))
    except NotFound:
        raise _not_found("fine-tuning job", job_id, "fine_tuning_job_id") from None


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(
    request: Request, who: Caller, after: str | None = None, limit: Annotated[int, Query()] = 20
) -> dict[str, Any]:
    _, jobs = _state(request)

    def page() -> Any:
        jobs.sweep()
        return jobs.list_jobs(_scope(who), after=after, limit=_limit(limit))

    try:
        found = await asyncio.to_thread(page)
    except NotFound:
        raise _not_found("fine-tuning job", after or "", "after") from None
    return page_object([job_object(j) for j in found.items], found.has_more)


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve_job(request: Request, who: Caller, job_id: str) -> dict[str, Any]:
    _, jobs = _state(request)
    return job_object(await asyncio.to_thread(_get_job, jobs, who, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(request: Request, who: Caller, job_id: str) -> dict[str, Any]:
    _, jobs = _state(request)

    def cancel() -> JobRecord:
        job = _get_job(jobs, who, job_id)
        try:
            return jobs.cancel_job(job.id, _scope(who))
        except Conflict as exc:
            raise api_error(exc, code="job_not_cancellable") from None

    return job_object(await asyncio.to_thread(cancel))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def list_events(
    request: Request, who: Caller, job_id: str, after: str | None = None, limit: int = 20
) -> dict[str, Any]:
    _, jobs = _state(request)

    def page() -> Any:
        job = _get_job(jobs, who, job_id)
        return jobs.list_events(job.id, after=after, limit=_limit(limit))

    found = await asyncio.to_thread(page)
    return page_object([event_object(e) for e in found.items], found.has_more)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(
    request: Request, who: Caller, job_id: str, after: str | None = None, limit: int = 10
) -> dict[str, Any]:
    _, jobs = _state(request)

    def page() -> Any:
        job = _get_job(jobs, who, job_id)
        return jobs.list_checkpoints(job.id, after=after, limit=_limit(limit))

    found = await asyncio.to_thread(page)
    return page_object([checkpoint_object(c) for c in found.items], found.has_more, ids=True)
