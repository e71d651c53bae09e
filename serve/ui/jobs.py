"""Dashboard pages: fine-tuning jobs (list, status, live events and loss curve, checkpoints,
cancel), and a form that uploads a training file and starts a job (its bad lines shown)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import Response

from adapterdeck.serve.ui.adapters import FormToken, Signed, redirect
from adapterdeck.serve.ui.client import Api, ApiFailed, path
from adapterdeck.serve.ui.render import page
from adapterdeck.serve.ui.session import checked

router = APIRouter(prefix="/ui", include_in_schema=False)
FINAL = {"succeeded", "failed", "cancelled"}
MAX_EVENTS = 2000  # events read for one page (20 pages of the API's 100)


@router.get("/jobs")
async def jobs(request: Request, who: Signed, after: str | None = None) -> Response:
    api = Api(request, who.key)
    listing = await api.get("/v1/fine_tuning/jobs", limit=50, after=after)
    base = request.app.state.settings.base_name()
    return page(request, "jobs.html", who, title="Fine-tuning", listing=listing, base=base)


@router.post("/jobs")
async def start_job(
    request: Request,
    file: UploadFile,
    model: Annotated[str, Form()],
    suffix: Annotated[str, Form()] = "",
    epochs: Annotated[str, Form()] = "",
    csrf: FormToken = None,
) -> Response:
    who = await checked(request, csrf)
    api = Api(request, who.key)
    base = request.app.state.settings.base_name()
    form = {"model": model, "suffix": suffix, "epochs": epochs}
    try:
        uploaded = await api.call(
            "POST", "/v1/files", data={"purpose": "fine-tune"},
            files={"file": (file.filename or "upload.jsonl", file.file, "application/jsonl")},
        )  # fmt: skip
        body: dict[str, Any] = {"model": model, "training_file": uploaded["id"]}
        if suffix:
            body["suffix"] = suffix
        if epochs:
            body["hyperparameters"] = {"n_epochs": int(epochs) if epochs.isdigit() else epochs}
        job = await api.post("/v1/fine_tuning/jobs", body)
    except ApiFailed as exc:
        if exc.status == 401:
            raise
        listing = await api.get("/v1/fine_tuning/jobs", limit=50)
        return page(request, "jobs.html", who, status=exc.status, title="Fine-tuning", listing=listing,
                    base=base, problem=exc.message, form=form)  # fmt: skip
    return redirect(path("ui", "jobs", job["id"]))


async def _events(api: Api, job_id: str) -> list[dict[str, Any]]:
    """The job's events, oldest first (up to ``MAX_EVENTS`` of the newest)."""
    found: list[dict[str, Any]] = []
    after = None
    while len(found) < MAX_EVENTS:
        batch = await api.get(path("v1", "fine_tuning", "jobs", job_id, "events"), limit=100, after=after)
        found += batch["data"]
        if not batch["has_more"] or not batch["data"]:
            break
        after = batch["data"][-1]["id"]
    return list(reversed(found))


def _curves(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    train, valid = [], []
    for e in events:
        data = e.get("data") or {}
        if e.get("type") != "metrics" or not isinstance(data.get("step"), int):
            continue
        if isinstance(data.get("train_loss"), int | float):
            train.append([data["step"], data["train_loss"]])
        if isinstance(data.get("valid_loss"), int | float):
            valid.append([data["step"], data["valid_loss"]])
    if not train and not valid:
        return None
    return {"series": {"training loss": train, "validation loss": valid}, "x": "step"}


async def _job_view(request: Request, who: Any, job_id: str) -> dict[str, Any]:
    api = Api(request, who.key)
    job = await api.get(path("v1", "fine_tuning", "jobs", job_id))
    events = await _events(api, job_id)
    checkpoints = await api.get(path("v1", "fine_tuning", "jobs", job_id, "checkpoints"), limit=100)
    return {
        "job": job, "events": events, "checkpoints": checkpoints["data"], "curves": _curves(events),
        "final": job["status"] in FINAL,
    }  # fmt: skip


@router.get("/jobs/{job_id}")
async def job(request: Request, who: Signed, job_id: str) -> Response:
    view = await _job_view(request, who, job_id)
    return page(request, "job.html", who, title=job_id, **view)


@router.get("/jobs/{job_id}/live")
async def job_live(request: Request, who: Signed, job_id: str) -> Response:
    """The part of the job page that changes while it trains (htmx polls it until it is over)."""
    view = await _job_view(request, who, job_id)
    # 286: htmx stops polling once the job is over.
    return page(request, "job_live.html", who, status=286 if view["final"] else 200, **view)


@router.post("/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: str, csrf: FormToken = None) -> Response:
    who = await checked(request, csrf)
    await Api(request, who.key).post(path("v1", "fine_tuning", "jobs", job_id, "cancel"))
    return redirect(path("ui", "jobs", job_id))
