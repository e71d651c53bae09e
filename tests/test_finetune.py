"""The OpenAI fine-tuning API, end to end: a real `adapterdeck serve` (gateway, vLLM CPU build, one
local fine-tuning worker) on a real SQLite registry, driven only by the official `openai` client;
cancellation and a SIGKILLed worker against real processes; job claiming by concurrent worker
processes on SQLite and PostgreSQL; a job's MLflow integration, logged to a local MLflow store."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from sqlalchemy import inspect

from adapterdeck.core.demo import SENTIMENT_SYSTEM, sentiment_record, write_demo_dataset
from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry import schema as t
from adapterdeck.registry.finetune import FineTuning
from adapterdeck.registry.tenants import create_key
from adapterdeck.serve import errors
from adapterdeck.serve.auth import Keys
from adapterdeck.serve.finetune import api as finetune_api
from adapterdeck.serve.finetune.worker import Worker, _checkpoint_metrics, _step_metrics
from adapterdeck.serve.limits import Limiter
from adapterdeck.serve.outage import DatabaseStatus
from adapterdeck.serve.settings import FineTuneSettings, LimitSettings, ServeSettings

from .conftest import free_port
from .gateway_helpers import launch, wait_ready
from .registry_helpers import postgres_database

LABELS = {"positive", "negative", "mixed"}
FT_TABLES = ("ft_files", "ft_jobs", "ft_job_events", "ft_checkpoints")
# The demo's learning rate (3e-3) as a multiple of LoRA's default (2e-4).
HYPER = {"n_epochs": 3, "batch_size": 16, "learning_rate_multiplier": 15}
LORA = {"adapterdeck": {"method": "lora", "params": {"r": 8}, "evaluators": ["loss", "exact_match"]}}
# OpenAI's checkpoint metrics besides the step, and its results file's columns (then the full
# validation split's, which adapterdeck's validation is).
CHECKPOINT_METRICS = (
    "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
    "full_valid_loss", "full_valid_mean_token_accuracy",
)  # fmt: skip
RESULTS_COLUMNS = (
    "step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy",
    "full_valid_loss", "full_valid_mean_token_accuracy",
)  # fmt: skip
PREFERENCE_METRICS = (
    "train_reward_margin",
    "train_reward_accuracy",
    "valid_reward_margin",
    "valid_reward_accuracy",
)


@dataclass
class Stack:
    url: str
    registry: Registry
    ft: FineTuning
    keys: dict[str, str]
    proc: subprocess.Popen
    log: Path
    data: Path

    def client(self, who: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[who], max_retries=0, timeout=120)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()


def _wait(predicate: Callable[[], Any], timeout: float, what: str, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (httpx.HTTPError, KeyError, ValueError, openai.APIConnectionError):
            pass
        time.sleep(0.25)
    tail = log.read_text()[-4000:] if log is not None else ""
    raise AssertionError(f"{what}: not within {timeout} s\n{tail}")


@pytest.fixture(scope="module")
def stack(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("finetune")
    home = root / "home"
    registry = Registry(RegistrySettings(home=home))
    keys = {
        "acme": create_key(registry, "acme"),
        "globex": create_key(registry, "globex"),
        "admin": create_key(registry, None),
    }
    config = root / "serve.yaml"
    # Short heartbeats and leases, so a dead worker is noticed within seconds here.
    finetune = {"workers": 1, "heartbeat_seconds": 0.5, "lease_seconds": 6, "poll_seconds": 0.5,
                "max_attempts": 2, "max_file_bytes": 2_000_000}  # fmt: skip
    config.write_text(yaml.safe_dump({"finetune": finetune}))
    port, vllm_port = free_port(), free_port()
    env = {"ADAPTERDECK_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    args = [
        "--base", base_model, "--config", config, "--port", str(port), "--vllm-port", str(vllm_port),
        "--max-model-len", "512", "--served-name", "tiny", "--dtype", "float32",
    ]  # fmt: skip
    process = launch("serve", args, env, root / "serve.log")
    stack = Stack(
        f"http://127.0.0.1:{port}", registry, FineTuning(registry), keys, process.proc, process.log, root
    )
    try:
        # Only the gateway: vLLM finishes starting while the first job trains.
        wait_ready(
            process, stack.url, lambda reply: reply.status_code in (200, 503),
            timeout=120, interval=0.25, request_timeout=5, what="gateway",
        )  # fmt: skip
        yield stack
    finally:
        process.stop(timeout=90)
        registry.close()


def _reviews(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"held-out-{seed}")
    out = []
    for _ in range(n):
        messages = sentiment_record(rng)["messages"]
        out.append((messages[1]["content"], messages[2]["content"]))
    return out


def _ask(client: openai.OpenAI, model: str, review: str) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SENTIMENT_SYSTEM}, {"role": "user", "content": review}],
        max_tokens=8,
        temperature=0,
    )


def _upload(stack: Stack, who: str, name: str, n: int, seed: int = 0) -> Any:
    path = write_demo_dataset(stack.data / name, task="sentiment", n=n, seed=seed)
    with path.open("rb") as fh:
        return stack.client(who).files.create(file=(name, fh), purpose="fine-tune")


def _events(client: openai.OpenAI, job_id: str) -> list[Any]:
    """Every event, oldest first."""
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=100))))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(") ", 1)[-1].startswith("Z"))


def _long_job(stack: Stack, file_id: str, suffix: str) -> Any:
    """A job that trains for minutes unless stopped."""
    return stack.client("acme").fine_tuning.jobs.create(
        model="tiny",
        training_file=file_id,
        suffix=suffix,
        seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 100, "batch_size": 4}}},
        extra_body=LORA,
    )


def _training(client: openai.OpenAI, job_id: str, attempt: int = 1) -> tuple[int, str]:
    """Once the job's ``attempt``-th training has reported a step: its process id and its worker."""

    def started() -> tuple[int, str] | None:
        events = _events(client, job_id)
        starts = [
            i
            for i, e in enumerate(events)
            if e.message.startswith("Training process") and " started" in e.message
        ]
        if len(starts) < attempt:
            return None
        first = events[starts[attempt - 1]]
        if not any(e.type == "metrics" for e in events[starts[attempt - 1] :]):
            return None
        return first.data["pid"], first.data["worker"]

    return _wait(started, 180, f"training of {job_id}, attempt {attempt}")


# -- uploads --------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_a_malformed_training_file_is_refused_with_its_line_numbers(stack: Stack) -> None:
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    lines = [
        good,
        '{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        "{not json",
        good,
        '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]}',
    ]
    client = stack.client("acme")
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
    message = info.value.body["message"]
    assert message.startswith("bad.jsonl: 4 bad line(s)")
    for number in (2, 3, 4, 5):
        assert f"line {number}:" in message, message
    assert "unknown role 'bot'" in message and "duplicate of line 1" in message
    assert "invalid JSON" in message and "line 5: no assistant turn" in message
    assert info.value.body["code"] == "invalid_file" and info.value.body["param"] == "file"
    # Too long for the base's context (512 tokens in the offline base's config or less): the same
    # length check as `adapterdeck data validate --base`.
    long = json.dumps(
        {"messages": [{"role": "user", "content": "word " * 3000}, {"role": "assistant", "content": "ok"}]}
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("long.jsonl", (good + "\n" + long + "\n").encode()), purpose="fine-tune")
    assert "line 2:" in info.value.body["message"] and "over the limit" in info.value.body["message"]
    assert client.files.list().data == []  # nothing of the refused uploads was kept


@pytest.mark.vllm
def test_upload_limits_and_purpose(stack: Stack) -> None:
    client = stack.client("acme")
    record = json.dumps(
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    )
    big = "\n".join(record.replace('"x"', f'"x{i}"') for i in range(30_000)).encode()
    assert len(big) > 2_000_000
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("big.jsonl", big), purpose="fine-tune")
    assert info.value.status_code == 413 and info.value.body["code"] == "file_too_large"
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", record.encode()), purpose="batch")
    with pytest.raises(openai.PermissionDeniedError):
        stack.client("admin").files.create(file=("x.jsonl", record.encode()), purpose="fine-tune")


@pytest.mark.vllm
def test_jobs_that_cannot_run_are_refused(stack: Stack) -> None:
    acme, globex = stack.client("acme"), stack.client("globex")
    small = _upload(stack, "acme", "small.jsonl", 5)
    good = _upload(stack, "acme", "refused-jobs.jsonl", 40, seed=5)
    cases: list[tuple[type[Exception], dict[str, Any], str]] = [
        (openai.NotFoundError, {"model": "nope"}, "model"),
        (openai.NotFoundError, {"model": "ft:tiny:acme::abcdefgh"}, "model"),  # continues nothing
        (openai.BadRequestError, {"training_file": "file-nope"}, "training_file"),
        (openai.BadRequestError, {"training_file": small.id}, "training_file"),
        (openai.BadRequestError, {"method": {"type": "reinforcement"}}, "method.type"),
        # Chat data for a DPO job: it trains on preference pairs.
        (openai.BadRequestError, {"method": {"type": "dpo"}}, "training_file"),
        (
            openai.BadRequestError,
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            "method.dpo.hyperparameters.beta",
        ),
        (openai.BadRequestError, {"method": {"type": "dpo", "supervised": {}}}, "method"),
        (openai.BadRequestError, {"suffix": "no:colons"}, "suffix"),
        (openai.BadRequestError, {"extra_body": {"adapterdeck": {"method": "nope"}}}, "adapterdeck"),
        (openai.BadRequestError, {"extra_body": {"adapterdeck": {"params": {"rank": 8}}}}, "adapterdeck"),
        (openai.BadRequestError, {"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ]
    for error, change, param in cases:
        args = {"model": "tiny", "training_file": good.id, **change}
        with pytest.raises(error) as info:
            acme.fine_tuning.jobs.create(**args)
        assert info.value.body["param"] == param, (change, info.value.body)
    # Another tenant's file is no file at all.
    with pytest.raises(openai.BadRequestError) as info:
        globex.fine_tuning.jobs.create(model="tiny", training_file=good.id)
    assert info.value.body["message"] == f"invalid training_file: no file {good.id}"
    with pytest.raises(openai.PermissionDeniedError):
        stack.client("admin").fine_tuning.jobs.create(model="tiny", training_file=good.id)
    assert acme.fine_tuning.jobs.list().data == []


# -- the hosted flow, self-hosted -------------------------------------------------------------------


@pytest.mark.vllm
def test_upload_fine_tune_and_call_the_model_with_the_openai_client(stack: Stack) -> None:
    started = time.monotonic()
    acme, globex = stack.client("acme"), stack.client("globex")
    path = write_demo_dataset(stack.data / "sentiment.jsonl", task="sentiment", n=200)
    uploaded = acme.files.create(file=path.open("rb"), purpose="fine-tune")
    assert uploaded.purpose == "fine-tune" and uploaded.bytes == path.stat().st_size
    assert acme.files.content(uploaded.id).content == path.read_bytes()
    assert acme.files.retrieve(uploaded.id).filename == "sentiment.jsonl"

    job = acme.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix="sentiment",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": HYPER}},
        metadata={"team": "reviews"},
        extra_body=LORA,
    )
    assert job.status == "queued" and job.model == "tiny" and job.seed == 7
    assert job.fine_tuned_model is None and job.metadata == {"team": "reviews"}
    seen = {job.status}

    def finished() -> Any:
        current = acme.fine_tuning.jobs.retrieve(job.id)
        seen.add(current.status)
        return current if current.status in ("succeeded", "failed", "cancelled") else None

    done = _wait(finished, 300, f"job {job.id}", stack.log)
    trained = time.monotonic() - started
    assert done.status == "succeeded", (done.error, stack.log.read_text()[-3000:])
    assert "running" in seen
    assert done.fine_tuned_model == f"ft:tiny:acme:sentiment:{job.id.removeprefix('ftjob-')[:8]}"
    assert done.hyperparameters.n_epochs == 3 and done.hyperparameters.batch_size == 16
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at >= done.created_at
    assert done.error is None
    assert [j.id for j in acme.fine_tuning.jobs.list()] == [job.id]

    # Events: validation, each epoch's losses, evaluation, publish, success; newest first, paged.
    events = _events(acme, job.id)
    messages = [e.message for e in events]
    assert (
        messages[0].startswith("Validating training file")
        and messages[-1] == "The job has successfully completed"
    )
    for epoch in (1, 2, 3):
        assert any(m.startswith(f"Epoch {epoch}/3: training loss") for m in messages), messages
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all(e.data["train_loss"] is not None for e in metrics[1:])
    evaluation = next(e for e in events if e.message.startswith("Evaluated on"))
    assert evaluation.data["exact_match"]["base"]["value"] == 0.0
    assert evaluation.data["exact_match"]["tuned"]["value"] > 0.3
    assert any(m.startswith("Published the fine-tuned model as acme/ft-sentiment-") for m in messages)
    first = acme.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(first.data) == 3 and first.has_more and first.data[0].message == messages[-1]
    paged = [e.id for e in acme.fine_tuning.jobs.list_events(job.id, limit=3)]  # auto-pagination
    assert paged == [e.id for e in reversed(events)]

    # Checkpoints: what the run kept, each served as its own registry version.
    checkpoints = acme.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(c.fine_tuning_job_id == job.id for c in checkpoints)
    assert all(
        c.fine_tuned_model_checkpoint.startswith(done.fine_tuned_model + ":ckpt-step-") for c in checkpoints
    )
    assert all(c.metrics.step == c.step_number and c.metrics.valid_loss is not None for c in checkpoints)
    for checkpoint in checkpoints:  # OpenAI's checkpoint metrics, every one a real number
        metrics = checkpoint.metrics
        assert set(metrics.to_dict()) == {"step", *CHECKPOINT_METRICS}, metrics
        assert all(isinstance(getattr(metrics, k), float) for k in CHECKPOINT_METRICS)
        assert all(0 <= getattr(metrics, k) <= 1 for k in CHECKPOINT_METRICS if k.endswith("accuracy"))
        # The whole validation split is what validation measures each time (docs/api.md).
        assert metrics.full_valid_loss == metrics.valid_loss
        assert metrics.full_valid_mean_token_accuracy == metrics.valid_mean_token_accuracy
    results = {acme.files.retrieve(i).filename: i for i in done.result_files}
    assert list(results) == ["step_metrics.csv", "report.json"]
    text = acme.files.content(results["step_metrics.csv"]).text
    assert text.splitlines()[0] == ",".join(RESULTS_COLUMNS) and len(text.splitlines()) > 5
    rows = list(csv.DictReader(io.StringIO(text)))
    train_rows = [r for r in rows if r["train_loss"]]
    validated = [r for r in rows if r["valid_loss"]]
    assert train_rows and validated
    assert all(0 <= float(r["train_accuracy"]) <= 1 for r in train_rows)
    assert all(0 <= float(r["valid_mean_token_accuracy"]) <= 1 for r in validated)
    assert float(train_rows[-1]["train_accuracy"]) > float(train_rows[0]["train_accuracy"])  # it learnt
    # Each checkpoint's metrics are its step's row (its training values: the last ones logged).
    by_step = {int(r["step"]): r for r in rows}
    for checkpoint in checkpoints:
        row = by_step[checkpoint.step_number]
        assert float(row["valid_loss"]) == checkpoint.metrics.valid_loss
        assert float(row["valid_mean_token_accuracy"]) == checkpoint.metrics.valid_mean_token_accuracy
        last = max(s for s, r in by_step.items() if r["train_loss"] and s <= checkpoint.step_number)
        assert float(by_step[last]["train_accuracy"]) == checkpoint.metrics.train_mean_token_accuracy

    # The fine-tuned model answers through vLLM at once, with no restart.
    _wait(lambda: stack.health()["status"] == "ok", 600, "vLLM ready", stack.log)
    reviews = _reviews(6, seed=1)
    tuned = [
        (_ask(acme, done.fine_tuned_model, r).choices[0].message.content or "").strip() for r, _ in reviews
    ]
    base = [(_ask(acme, "tiny", r).choices[0].message.content or "").strip() for r, _ in reviews]
    print(f"trained in {trained:.0f} s; tuned: {tuned}; base: {base}")
    assert sum(answer in LABELS for answer in tuned) >= 5, tuned
    assert not any(answer in LABELS for answer in base), base
    reply = acme.chat.completions.with_raw_response.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": reviews[0][0]}], max_tokens=2
    )
    ref = reply.headers["x-adapterdeck-ref"]
    assert ref.startswith("acme/ft-sentiment-") and ref == done.to_dict()["adapterdeck"]["ref"]
    checkpoint = _ask(acme, checkpoints[0].fine_tuned_model_checkpoint, reviews[0][0])
    assert checkpoint.model == checkpoints[0].to_dict()["adapterdeck"]["ref"] != ref
    owned = {m.id for m in acme.models.list()}
    assert done.fine_tuned_model in owned and checkpoints[0].fine_tuned_model_checkpoint in owned

    # Another tenant sees none of it: the same 404 as for what does not exist.
    assert not any(m.id.startswith("ft:") for m in globex.models.list())
    assert globex.files.list().data == [] and globex.fine_tuning.jobs.list().data == []
    not_found = []
    for call in (
        lambda: globex.files.retrieve(uploaded.id),
        lambda: globex.files.content(uploaded.id),
        lambda: globex.files.delete(uploaded.id),
        lambda: globex.fine_tuning.jobs.retrieve(job.id),
        lambda: globex.fine_tuning.jobs.cancel(job.id),
        lambda: globex.fine_tuning.jobs.list_events(job.id),
        lambda: globex.fine_tuning.jobs.checkpoints.list(job.id),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        not_found.append(info.value.body["message"])
    assert not_found[0] == f"No such file: {uploaded.id}"
    messages = []
    for model in (done.fine_tuned_model, done.fine_tuned_model[:-1] + "x", "ft:tiny:globex::nothing1"):
        with pytest.raises(openai.NotFoundError) as info:
            _ask(globex, model, reviews[0][0])
        messages.append(info.value.body["message"].replace(model, "M"))
    assert len(set(messages)) == 1
    # The owner's admin sees it; a finished job cannot be cancelled; the file can be deleted.
    assert stack.client("admin").fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    with pytest.raises(openai.ConflictError):
        acme.fine_tuning.jobs.cancel(job.id)
    assert acme.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(uploaded.id)
    assert _ask(acme, done.fine_tuned_model, reviews[0][0]).model == ref  # the model outlives its file


@pytest.mark.vllm
def test_a_dpo_job_through_the_openai_client(stack: Stack) -> None:
    """OpenAI's DPO method on preference lines: the job trains with TRL's DPOTrainer, reports the
    held-out preference accuracy, and its model answers at once."""
    from .test_objectives import write_pairs

    acme = stack.client("acme")
    path = write_pairs(stack.data / "pairs.jsonl")
    uploaded = acme.files.create(file=path.open("rb"), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix="prefers",
        seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 8,
                                                           "learning_rate_multiplier": 15}}},
        extra_body={"adapterdeck": {"method": "lora", "evaluators": ["loss"]}},
    )  # fmt: skip
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.to_dict()["adapterdeck"]["objective"] == {"name": "dpo"}

    def finished() -> Any:
        current = acme.fine_tuning.jobs.retrieve(job.id)
        return current if current.status in ("succeeded", "failed", "cancelled") else None

    done = _wait(finished, 300, f"job {job.id}", stack.log)
    assert done.status == "succeeded", (done.error, stack.log.read_text()[-3000:])
    assert done.method.type == "dpo" and done.method.dpo.hyperparameters.n_epochs == 2
    events = _events(acme, job.id)
    evaluation = next(e for e in events if e.message.startswith("Evaluated on"))
    accuracy = evaluation.data["preference_accuracy"]
    assert accuracy["tuned"]["value"] >= 0.9 > accuracy["base"]["value"], accuracy
    checkpoints = acme.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints
    for checkpoint in checkpoints:  # besides OpenAI's, TRL's reward margin and accuracy
        metrics = checkpoint.metrics.to_dict()
        assert set(metrics) == {"step", *CHECKPOINT_METRICS, *PREFERENCE_METRICS}, metrics
        assert all(0 <= metrics[k] <= 1 for k in metrics if k.endswith("accuracy"))
    assert max(c.metrics.to_dict()["valid_reward_margin"] for c in checkpoints) > 0  # it prefers
    results = {acme.files.retrieve(i).filename: i for i in done.result_files}
    text = acme.files.content(results["step_metrics.csv"]).text
    assert text.splitlines()[0] == ",".join([*RESULTS_COLUMNS, *PREFERENCE_METRICS])
    _wait(lambda: stack.health()["status"] == "ok", 600, "vLLM ready", stack.log)
    reply = acme.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Is apple a word?"}], max_tokens=8
    )
    assert reply.choices[0].message.content is not None
    assert reply.model.startswith("acme/ft-prefers-")


@pytest.mark.vllm
def test_a_job_continues_the_tenant_s_own_fine_tuned_model(stack: Stack) -> None:
    """``model="ft:..."``: the job starts from that model's weights (its validation loss before
    the first step is the parent's best, on the same data and seed), its result names the parent
    as lineage, and no other tenant may continue it."""
    acme, globex = stack.client("acme"), stack.client("globex")
    uploaded = _upload(stack, "acme", "continued.jsonl", 120, seed=4)
    hyper = {"n_epochs": 1, "batch_size": 16, "learning_rate_multiplier": 15}
    options = {"adapterdeck": {"method": "lora", "params": {"r": 8}, "evaluators": ["loss"]}}

    def run(model: str, suffix: str) -> Any:
        job = acme.fine_tuning.jobs.create(
            model=model, training_file=uploaded.id, suffix=suffix, seed=11, hyperparameters=hyper,
            extra_body=options,
        )  # fmt: skip

        def finished() -> Any:
            current = acme.fine_tuning.jobs.retrieve(job.id)
            return current if current.status in ("succeeded", "failed", "cancelled") else None

        done = _wait(finished, 300, f"job {job.id}", stack.log)
        assert done.status == "succeeded", (done.error, stack.log.read_text()[-3000:])
        return job, done

    _, first = run("tiny", "first")
    first_ref = first.to_dict()["adapterdeck"]["ref"]
    job, second = run(first.fine_tuned_model, "second")
    assert job.model == first.fine_tuned_model == second.model
    assert second.to_dict()["adapterdeck"]["parent"] == first_ref
    assert second.fine_tuned_model.startswith("ft:tiny:acme:second:")
    ref = second.to_dict()["adapterdeck"]["ref"]
    assert stack.registry.show(ref).parent == first_ref
    theirs, ours = stack.registry.report(first_ref), stack.registry.report(ref)
    assert theirs is not None and ours is not None
    start, best = ours["parent"]["start_val_loss"], theirs["training"]["best_val_loss"]
    print(f"continued job: start validation loss {start:.5f}, the parent's best {best:.5f}")
    assert start == pytest.approx(best, rel=1e-5)

    # Another tenant's fine-tuned model, as the model of a job: the 404 of a missing one.
    theirs_file = _upload(stack, "globex", "continued.jsonl", 40, seed=4)
    with pytest.raises(openai.NotFoundError) as info:
        globex.fine_tuning.jobs.create(model=first.fine_tuned_model, training_file=theirs_file.id)
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    # A continued job trains its parent's method.
    with pytest.raises(openai.BadRequestError) as info:
        acme.fine_tuning.jobs.create(
            model=first.fine_tuned_model, training_file=uploaded.id,
            extra_body={"adapterdeck": {"method": "prefix"}},
        )  # fmt: skip
    assert "a job that continues it trains lora, not prefix" in info.value.body["message"]
    assert info.value.body["param"] == "adapterdeck.method"


@pytest.mark.vllm
def test_cancel_stops_a_running_job_within_10_seconds(stack: Stack) -> None:
    acme = stack.client("acme")
    uploaded = _upload(stack, "acme", "cancel.jsonl", 200, seed=2)
    job = _long_job(stack, uploaded.id, "cancelme")
    pid, _ = _training(acme, job.id)
    assert _pid_alive(pid)
    asked = time.monotonic()
    cancelled = acme.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"

    def stopped() -> bool:
        return any(e.message.startswith(f"Training process {pid} stopped") for e in _events(acme, job.id))

    _wait(lambda: stopped() and not _pid_alive(pid), 10, "the cancelled training stopped", stack.log)
    took = time.monotonic() - asked
    print(f"cancel took {took:.1f} s")
    assert took < 10
    time.sleep(1)
    after = acme.fine_tuning.jobs.retrieve(job.id)
    assert after.status == "cancelled" and after.fine_tuned_model is None
    assert not [a for a in stack.registry.list("acme") if a["name"].startswith("ft-cancelme-")]
    with pytest.raises(openai.ConflictError):
        acme.fine_tuning.jobs.cancel(job.id)


@pytest.mark.vllm
def test_a_killed_worker_s_job_is_requeued_then_failed_never_left_running(stack: Stack) -> None:
    acme = stack.client("acme")
    uploaded = _upload(stack, "acme", "kill.jsonl", 200, seed=3)
    job = _long_job(stack, uploaded.id, "killme")
    outcomes = []
    for attempt in (1, 2):
        pid, worker = _training(acme, job.id, attempt)
        worker_pid = int(worker.rsplit(":", 1)[1])
        assert worker_pid != pid and _pid_alive(worker_pid)
        os.kill(worker_pid, signal.SIGKILL)  # `adapterdeck serve` starts a new local worker
        _wait(lambda pid=pid: not _pid_alive(pid), 10, "the dead worker's training gone")

        def moved_on(attempt: int = attempt) -> Any:
            current = acme.fine_tuning.jobs.retrieve(job.id)  # the gateway sweeps as it reads
            held = current.status == "running" and current.to_dict()["adapterdeck"]["attempts"] == attempt
            return None if held else current

        current = _wait(moved_on, 30, f"job {job.id} no longer held by the dead worker", stack.log)
        outcomes.append(current.status)
        if attempt == 1:
            assert current.status in ("queued", "running")
    final = acme.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "failed" and final.error.code == "worker_lost", final
    assert final.fine_tuned_model is None
    messages = [e.message for e in _events(acme, job.id)]
    assert any("stopped heartbeating" in m and "requeued after attempt 1 of 2" in m for m in messages), (
        messages
    )
    assert any("stopped heartbeating" in m and "on the last of 2 attempts" in m for m in messages), messages
    print(f"after each kill: {outcomes}")


# -- failures -------------------------------------------------------------------------------------


def test_a_job_that_cannot_train_fails_with_an_error_object(base_model: Path, tmp_path: Path) -> None:
    """A worker, in this process, on a real SQLite registry: its training child really fails."""
    registry = Registry(RegistrySettings(home=tmp_path / "home"))
    try:
        ft = FineTuning(registry)
        files = []
        for i in range(2):
            data = write_demo_dataset(tmp_path / f"d{i}.jsonl", task="sentiment", n=20, seed=i)
            files.append(ft.add_file("acme", data.name, "fine-tune", path=data, format="chat", examples=20))
        jobs = []
        for file, base in ((files[0], str(base_model)), (files[1], str(tmp_path / "no-such-base"))):
            job = ft.create_job(
                "acme", model="tiny", base=base, training_file=file.id, validation_file=None, suffix=None,
                seed=0, hyperparameters={}, adapter_method={"name": "lora"}, evaluators=["loss"],
                metadata=None, max_attempts=2,
            )  # fmt: skip
            jobs.append(ft.files_validated(job.id, {}).id)
        ft.delete_file(files[0].id, "acme")  # after the job was created, before a worker took it
        worker = Worker(registry, FineTuneSettings(heartbeat_seconds=0.5), worker_id="test:1")
        for _ in jobs:
            claimed = ft.claim_next(worker.worker_id, 30)
            assert claimed is not None
            worker.run_job(claimed)
        deleted, no_base = (ft.get_job(job_id, "acme") for job_id in jobs)
        assert deleted.status == "failed" and deleted.error is not None
        assert deleted.error["code"] == "invalid_training_file" and deleted.error["param"] == "training_file"
        assert f"{files[0].id} was deleted" in deleted.error["message"]
        assert no_base.status == "failed" and no_base.error is not None
        assert no_base.error["code"] == "invalid_training_run"
        assert "cannot load the tokenizer of base model" in no_base.error["message"]
        events = [e.message for e in ft.list_events(no_base.id, limit=100).items]
        assert events[0].startswith("The job failed: ") and any(
            m.startswith("Training process") for m in events
        )
        assert registry.list("acme") == [] and ft.claim_next(worker.worker_id, 30) is None
    finally:
        registry.close()


def test_checkpoint_metrics_and_the_results_file_from_a_report() -> None:
    """What a worker publishes, from a run's report: OpenAI's names, the values of each step."""
    training = {
        "train_loss": [{"step": 2, "loss": 2.0}, {"step": 4, "loss": 1.5}, {"step": 6, "loss": 1.0}],
        "train_mean_token_accuracy": [
            {"step": s, "accuracy": a} for s, a in ((2, 0.25), (4, 0.5), (6, 0.75))
        ],
        "val_loss": [{"step": 3, "loss": 1.75}, {"step": 6, "loss": 1.25}],
        "val_mean_token_accuracy": [{"step": 3, "accuracy": 0.4}, {"step": 6, "accuracy": 0.6}],
        "objective_metrics": {"train": {}, "validation": {}},
    }
    # At step 3 the training values are step 2's (logged last at or before it); validation's, its own.
    assert _checkpoint_metrics({"training": training}, 3) == {
        "step": 3,
        "train_loss": 2.0,
        "train_mean_token_accuracy": 0.25,
        "valid_loss": 1.75,
        "valid_mean_token_accuracy": 0.4,
        "full_valid_loss": 1.75,
        "full_valid_mean_token_accuracy": 0.4,
    }
    assert _step_metrics({"training": training}).decode().splitlines() == [
        ",".join(RESULTS_COLUMNS),
        "2,2.0,0.25,,,,",
        "3,,,1.75,0.4,1.75,0.4",
        "4,1.5,0.5,,,,",
        "6,1.0,0.75,1.25,0.6,1.25,0.6",
    ]
    # A report from before the accuracy was logged: its columns are there, empty.
    old = {"train_loss": training["train_loss"], "val_loss": training["val_loss"]}
    assert _step_metrics({"training": old}).decode().splitlines()[2] == "3,,,1.75,,1.75,"
    assert _checkpoint_metrics({"training": old}, 6)["train_mean_token_accuracy"] is None

    # A preference objective's (TRL's) reward margin and accuracy, on training and validation batches.
    training["objective_metrics"] = {
        "train": {
            "rewards/margins": [{"step": 6, "value": 0.5}],
            "rewards/accuracies": [{"step": 6, "value": 0.875}],
            "rewards/chosen": [{"step": 6, "value": 0.1}],
        },
        "validation": {
            "rewards/margins": [{"step": 6, "value": 0.25}],
            "rewards/accuracies": [{"step": 6, "value": 0.75}],
        },
    }
    metrics = _checkpoint_metrics({"training": training}, 6)
    assert [metrics[k] for k in PREFERENCE_METRICS] == [0.5, 0.875, 0.25, 0.75]
    lines = _step_metrics({"training": training}).decode().splitlines()
    assert lines[0] == ",".join([*RESULTS_COLUMNS, *PREFERENCE_METRICS])
    assert lines[-1] == "6,1.0,0.75,1.25,0.6,1.25,0.6,0.5,0.875,0.25,0.75"


# -- claiming, on SQLite and PostgreSQL, by concurrent processes -------------------------------------

CLAIMER = """
import json, os, sys, time
from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.finetune import FineTuning
home, url, gate, worker, action = sys.argv[1:6]
ft = FineTuning(Registry(RegistrySettings(home=home, database_url=url)))
ft.list_jobs(None, limit=1)  # connected
open(f"{gate}.{worker}.ready", "w").close()
while not os.path.exists(gate):
    time.sleep(0.005)
if action == "claim":
    claimed = []
    while (job := ft.claim_next(worker, 0.0)) is not None:  # a lease that runs out at once
        claimed.append(job.id)
        time.sleep(0.02)  # a worker does something with its job before it claims the next
    print(json.dumps(claimed))
else:
    print(json.dumps([job_id for job_id, _ in ft.sweep()]))
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    with postgres_database() as url:
        yield url


def _race(home: Path, url: str, action: str, n: int, tmp: Path) -> list[list[str]]:
    gate = tmp / f"go-{action}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(home), url, str(gate), f"host:{i}", action],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    # Release them together, once every one has imported and connected.
    _wait(lambda: all(Path(f"{gate}.host:{i}.ready").exists() for i in range(n)), 120, "claimers ready")
    gate.touch()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_concurrent_workers_never_claim_the_same_job(database: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    registry = Registry(RegistrySettings(home=home, database_url=database))
    try:
        found = inspect(registry.engine)
        for name in FT_TABLES:  # the migration builds exactly the tables and columns the code uses
            assert {c["name"] for c in found.get_columns(name)} == set(t.metadata.tables[name].columns.keys())
        ft = FineTuning(registry)
        data = b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
        file = ft.add_file("acme", "a.jsonl", "fine-tune", data=data, format="chat", examples=10)
        jobs = []
        for i in range(40):
            job = ft.create_job(
                "acme", model="tiny", base="tiny", training_file=file.id, validation_file=None, suffix=None,
                seed=i, hyperparameters={}, adapter_method={"name": "lora"}, evaluators=["loss"],
                metadata=None, max_attempts=2,
            )  # fmt: skip
            jobs.append(ft.files_validated(job.id, {}).id)

        claims = _race(home, database, "claim", 4, tmp_path)
        claimed = [job_id for batch in claims for job_id in batch]
        print("claims per worker:", [len(batch) for batch in claims])
        assert sorted(claimed) == sorted(jobs)  # every job once, none twice
        assert sum(1 for batch in claims if batch) >= 2  # they really competed
        for job_id in jobs:
            assert ft.get_job(job_id, "acme").status == "running"

        # Every lease has run out: four sweepers at once requeue each job exactly once.
        sweeps = _race(home, database, "sweep", 4, tmp_path)
        swept = [job_id for batch in sweeps for job_id in batch]
        assert sorted(swept) == sorted(jobs)
        for job_id in jobs:
            job = ft.get_job(job_id, "acme")
            assert (job.status, job.attempts, job.worker_id) == ("queued", 1, None)
            requeued = [e for e in ft.list_events(job_id).items if "requeued" in e.message]
            assert len(requeued) == 1
    finally:
        registry.close()


# -- integrations: a job logged to MLflow -----------------------------------------------------------


def test_a_job_with_an_mlflow_integration_is_logged_to_the_store(base_model: Path, tmp_path: Path) -> None:
    """The fine-tuning API alone (no engine) on a real SQLite registry, driven by the openai client,
    and a worker in this process: the job keeps its integration and answers it as given, its run is
    logged to the MLflow store, KILLED when it is cancelled; wandb, other types, another store and bad
    settings are 400s."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The operator's experiment, its artifacts under the test's directory.
    mlflow = MlflowClient(tracking_uri=uri)
    experiment = mlflow.create_experiment("acme-support", artifact_location=(tmp_path / "artifacts").as_uri())
    registry = Registry(RegistrySettings(home=tmp_path / "home"))
    settings = ServeSettings(base=str(base_model), finetune={"mlflow_tracking_uris": [uri]})
    app = FastAPI()
    app.state.keys = Keys(registry, DatabaseStatus(), Limiter(LimitSettings(), {}))
    app.state.settings, app.state.registry = settings, registry
    errors.install(app)
    app.include_router(finetune_api.router)
    try:
        with TestClient(app) as http:
            acme = openai.OpenAI(base_url="http://testserver/v1", api_key=create_key(registry, "acme"),
                                 http_client=http, max_retries=0)  # fmt: skip
            path = write_demo_dataset(tmp_path / "support.jsonl", task="support", n=40)
            uploaded = acme.files.create(file=path.open("rb"), purpose="fine-tune")
            hyper = {"n_epochs": 1, "batch_size": 8}
            job_args: dict[str, Any] = {
                "model": settings.base_name(), "training_file": uploaded.id, "seed": 1,
                "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
                "extra_body": {"adapterdeck": {"method": "lora", "params": {"r": 8}, "evaluators": ["loss"]}},
            }  # fmt: skip
            refused = [
                ({"type": "wandb", "wandb": {"project": "p"}}, "integrations.0.type", "Weights & Biases"),
                ({"type": "neptune", "neptune": {}}, "integrations.0.type",
                 "unknown integration type 'neptune'; supported: mlflow"),
                ({"type": "mlflow", "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'x.db'}"}},
                 "integrations.0.mlflow.tracking_uri", "is not one this server logs to; it logs to: " + uri),
                ({"type": "mlflow", "mlflow": {"artifact_location": "file:///etc"}},
                 "integrations.0.mlflow.artifact_location", "cannot be set through the API"),
                ({"type": "mlflow", "mlflow": {"experimnt": "x"}}, "integrations.0.mlflow.experimnt",
                 "Extra inputs are not permitted"),
                ({"type": "mlflow", "mlflow": {}, "wandb": {}}, "integrations.0", "unknown key 'wandb'"),
            ]  # fmt: skip
            for integration, param, message in refused:
                with pytest.raises(openai.BadRequestError) as info:
                    acme.fine_tuning.jobs.create(**job_args, integrations=[integration])
                assert info.value.body["param"] == param, (integration, info.value.body)
                assert message in info.value.body["message"], (integration, info.value.body)
            assert acme.fine_tuning.jobs.list().data == []

            given = {"type": "mlflow", "mlflow": {"experiment": "acme-support", "tags": {"team": "support"}}}
            job = acme.fine_tuning.jobs.create(**job_args, integrations=[given])
            kept = [{"type": "mlflow", "mlflow": {"tracking_uri": uri, **given["mlflow"]}}]  # the default URI
            assert job.to_dict()["integrations"] == kept

            ft = FineTuning(registry)
            worker = Worker(registry, FineTuneSettings(heartbeat_seconds=0.5), worker_id="test:1")
            claimed = ft.claim_next(worker.worker_id, 30)
            assert claimed is not None and claimed.id == job.id
            worker.run_job(claimed)
            done = acme.fine_tuning.jobs.retrieve(job.id)
            assert done.status == "succeeded", done.error
            assert done.to_dict()["integrations"] == kept
            report = json.loads(acme.files.content(done.result_files[1]).content)

            # A job cancelled while it trains: its training stops on SIGTERM, its run is KILLED.
            hyper.update(n_epochs=100)
            long = acme.fine_tuning.jobs.create(**job_args, integrations=[given])
            claimed = ft.claim_next(worker.worker_id, 30)
            assert claimed is not None and claimed.id == long.id
            running = threading.Thread(target=worker.run_job, args=(claimed,))
            running.start()

            def training() -> Any:
                runs = mlflow.search_runs([experiment], filter_string=f"attributes.run_name = '{long.id}'")
                return runs and runs[0].data.metrics.get("loss") is not None and runs[0]

            started = _wait(training, 180, f"training of {long.id}")
            acme.fine_tuning.jobs.cancel(long.id)
            running.join(timeout=60)
            assert not running.is_alive()
            assert acme.fine_tuning.jobs.retrieve(long.id).status == "cancelled"
            assert mlflow.get_run(started.info.run_id).info.status == "KILLED"

        run = mlflow.search_runs([experiment], filter_string=f"attributes.run_name = '{job.id}'")[0]
        assert run.info.run_name == job.id and run.info.status == "FINISHED"
        assert run.data.tags["team"] == "support"
        assert run.data.params["method.r"] == "8" and run.data.params["train.epochs"] == "1.0"
        assert run.data.params["data.sha256"] == report["data"]["sha256"]
        losses = [(m.step, m.value) for m in mlflow.get_metric_history(run.info.run_id, "loss")]
        assert losses and losses == [(p["step"], p["loss"]) for p in report["training"]["train_loss"]]
        assert {a.path for a in mlflow.list_artifacts(run.info.run_id)} == {
            "report.json",
            "loss.png",
            "adapter",
        }
        copy = mlflow.download_artifacts(run.info.run_id, "report.json", str(tmp_path / "download"))
        assert json.loads(Path(copy).read_text()) == report
    finally:
        registry.close()
