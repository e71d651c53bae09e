"""The OpenAI shapes of fine-tuning: the request body of a job and the objects answered (files,
jobs, events, checkpoints, list pages)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from adapterdeck.registry.finetune import CheckpointRecord, EventRecord, FileRecord, JobRecord, epoch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _auto_or(kind: type, low: float, high: float) -> Any:
    """A hyperparameter: "auto", or a number of ``kind`` in ``(low, high]`` (ints: ``[low, high]``)."""

    def check(value: Any) -> Any:
        if value == "auto":
            return value
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and kind is int and float(value).is_integer() and low <= value <= high:
            return int(value)
        if number and kind is float and low < value <= high:
            return float(value)
        span = (
            f"an integer from {low:g} to {high:g}"
            if kind is int
            else f"a number above {low:g}, at most {high:g}"
        )
        raise ValueError(f"expected 'auto' or {span}, got {value!r}")

    return Annotated[Any, AfterValidator(check)]


class Hyperparameters(_Strict):
    n_epochs: _auto_or(int, 1, 100) = "auto"  # type: ignore[valid-type]
    batch_size: _auto_or(int, 1, 256) = "auto"  # type: ignore[valid-type]
    learning_rate_multiplier: _auto_or(float, 0, 100) = "auto"  # type: ignore[valid-type]


class Supervised(_Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoHyperparameters(Hyperparameters):
    beta: _auto_or(float, 0, 2) = "auto"  # type: ignore[valid-type]


class Dpo(_Strict):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(_Strict):
    """OpenAI's ``method``: ``supervised`` (objective ``sft``) or ``dpo`` on preference pairs."""

    type: Literal["supervised", "dpo"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None

    @model_validator(mode="after")
    def _matching(self) -> Method:
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"method.{other} given for a method of type {self.type!r}")
        return self


class Integration(BaseModel):
    """One of OpenAI's ``integrations``: ``{"type": T, T: {its settings}}``, as
    ``{"type": "mlflow", "mlflow": {"tracking_uri": ..., "experiment": ...}}``."""

    model_config = ConfigDict(extra="allow")
    type: str


class AdapterdeckOptions(_Strict):
    """adapterdeck's extension of a job: the method plugin, its parameters and the evaluators."""

    method: str = "lora"
    params: dict[str, Any] = Field(default_factory=dict)
    evaluators: list[str] = Field(default_factory=lambda: ["loss", "exact_match"])


class JobCreate(_Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")] | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI in favour of method
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    integrations: list[Integration] | None = Field(None, max_length=8)
    adapterdeck: AdapterdeckOptions = Field(default_factory=AdapterdeckOptions)


def file_object(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": epoch(record.created_at),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def job_object(job: JobRecord) -> dict[str, Any]:
    dpo = (job.objective or {}).get("name") == "dpo"
    fields = DpoHyperparameters.model_fields if dpo else Hyperparameters.model_fields
    hyper = {k: job.hyperparameters.get(k, "auto") for k in fields}
    method = {"type": "dpo", "dpo": {"hyperparameters": hyper}} if dpo else {
        "type": "supervised", "supervised": {"hyperparameters": hyper}
    }  # fmt: skip
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": epoch(job.created_at),
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": epoch(job.finished_at),
        "hyperparameters": hyper,
        "model": job.parent["model"] if job.parent else job.model,
        "organization_id": job.tenant,
        "result_files": job.result_files,
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": epoch(job.estimated_finish),
        "integrations": job.integrations or [],
        "metadata": job.user_metadata,
        "method": method,
        "user_provided_suffix": job.suffix,
        "adapterdeck": {
            "method": job.adapter_method,
            "objective": job.objective or {"name": "sft"},
            "evaluators": job.evaluators,
            "attempts": job.attempts,
            "max_attempts": job.max_attempts,
            "adapter": job.adapter,
            "ref": job.result_ref,
            "parent": job.parent["ref"] if job.parent else None,
        },
    }


def event_object(event: EventRecord) -> dict[str, Any]:
    return {
        "id": event.public_id,
        "object": "fine_tuning.job.event",
        "created_at": epoch(event.created_at),
        "level": event.level,
        "message": event.message,
        "data": event.data or {},
        "type": event.type,
    }


def checkpoint_object(checkpoint: CheckpointRecord) -> dict[str, Any]:
    return {
        "id": checkpoint.public_id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": epoch(checkpoint.created_at),
        "fine_tuned_model_checkpoint": checkpoint.name,
        "fine_tuning_job_id": checkpoint.job_id,
        "metrics": {k: v for k, v in checkpoint.metrics.items() if v is not None},
        "step_number": checkpoint.step,
        "adapterdeck": {"ref": checkpoint.ref},
    }


def page_object(data: list[dict[str, Any]], has_more: bool, ids: bool = False) -> dict[str, Any]:
    """A list page; with ``ids``, the first and last ids too (OpenAI's files and checkpoints)."""
    if not ids:
        return {"object": "list", "data": data, "has_more": has_more}
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
