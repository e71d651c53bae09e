"""``adapterdeck train``: validate -> split -> encode -> tune with the Trainer -> evaluate -> report.

Training uses the transformers Trainer; ``adapterdeck train --processes N`` (or ``accelerate
launch`` / ``torchrun``) runs it data-parallel in N processes (``distributed.py``): only the main
process writes the run directory. Validation loss is measured as training goes;
training stops early when it stops improving and the best checkpoint is kept. The first
Ctrl-C stops after the current step and still writes a usable adapter and a report that
says it was interrupted; a second one aborts at once.

``run_training`` reads as the list of stages, each one function: the data (validated, split,
mixed, encoded: ``rundata.py``), then below it in order the model, the Trainer, training, the
adapter, the report and the evaluation. What is shown while it runs is ``progress.py`` and
``report.py``; the precision a run computes in is ``precision.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterdeck.core import __version__
from adapterdeck.core.adapters import ADAPTER_META
from adapterdeck.core.basemodel import fingerprint
from adapterdeck.core.config import RunConfig
from adapterdeck.core.continued import (
    Parent,
    find_parent,
    load_parent_weights,
    parent_params,
)
from adapterdeck.core.distributed import (
    FSDP_NEEDS_ACCELERATORS,
    World,
    check_strategy,
    deepspeed_arguments,
    fsdp_arguments,
    gather_trained,
    per_process_batch,
    stop_together,
    world,
)
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.evalcache import default_cache_dir, open_cache
from adapterdeck.core.evaluate import compare, pick_shots, prompt_verdict
from adapterdeck.core.evaluators import Evaluator
from adapterdeck.core.methods import MethodParams, TuningMethod
from adapterdeck.core.objectives import (
    ObjectiveParams,
    TrainerParts,
    TrainingObjective,
)
from adapterdeck.core.plugins import catalog
from adapterdeck.core.precision import Precision, choose_precision
from adapterdeck.core.progress import Interrupts, Reporter, trainer_callback
from adapterdeck.core.report import build_report, plot_losses, write_report, write_step_metrics
from adapterdeck.core.rundata import RunData, check_data_kinds, load_data
from adapterdeck.core.trackers import RunTrackers

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import (
        PreTrainedModel,
        PreTrainedTokenizerBase,
        Trainer,
        TrainerState,
    )

STALE = ("adapter", "report.json", "loss.png", "step_metrics.csv", "checkpoints")


@dataclass
class TrainResult:
    run_dir: Path
    report: dict[str, Any] | None  # None in the other processes of a multi-process run
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase


@dataclass
class Tuning:
    """The model being tuned: the base, the adapter on it, and how it computes."""

    method: TuningMethod
    params: MethodParams
    objective: TrainingObjective
    objective_params: ObjectiveParams
    base: PreTrainedModel
    model: PeftModel
    precision: Precision
    packing: bool
    trainable: int
    total: int
    parent: Parent | None = None  # the adapter the run continues from (``init_adapter``)


@dataclass(frozen=True)
class Schedule:
    """The steps planned, how often validation runs, and the learning rate."""

    total_steps: int
    eval_steps: int
    learning_rate: float


@dataclass
class Outcome:
    """How training ended."""

    state: TrainerState
    stop_reason: str  # completed, early_stopping or interrupted
    seconds: float
    start_val_loss: float | None = None  # a continued run's validation loss before its first step
    gathered: dict[str, Any] | None = None  # under FSDP: the trained weights, whole
    device: str = "cpu"  # where this process trained


def run_training(
    config: RunConfig, reporter: Reporter | None = None, overwrite: bool = False, run_name: str | None = None
) -> TrainResult:
    """Run a whole training run: ``adapter/``, ``report.json`` and ``loss.png`` under ``config.output``;
    logged to the trackers in ``config.log`` (as ``run_name``, default the output directory's name).
    In a run of several processes, the others train beside the main one and return ``report``
    None: only the main process reports, writes and evaluates."""
    here = world()
    rep = reporter if reporter is not None and here.main else Reporter()
    if here.distributed:
        check_strategy(config.train.strategy, here.size)
        per_process_batch(config.train.batch_size, here.size)
        rep.note(f"{here.size} processes ({config.train.strategy}), this is the main one")
    started = time.monotonic()
    durations: dict[str, float] = {}
    plugins = catalog()
    method = plugins.method(config.method.name)
    params = config.method_params(plugins)
    objective = plugins.objective(config.objective.name)
    objective_params = config.objective_params(plugins)
    names = [*config.eval.evaluators, *(n for n in objective.evaluators if n not in config.eval.evaluators)]
    evaluators = [plugins.evaluator(n) for n in names]
    if here.main:
        check_output(config.output, overwrite)
    parent = None
    if config.init_adapter:
        parent = find_parent(config, method)
        params = parent_params(config, method, parent)
        rep.note(f"continuing from {parent.ref}")

    rep.stage("validating data")
    data = load_data(config, rep)
    check_data_kinds(objective, data)
    durations["validate"] = _since(started)

    trackers = (
        RunTrackers.for_run(config, plugins, data.sha256, (params, objective_params), run_name, rep)
        if here.main
        else RunTrackers([], rep)
    )
    with trackers:
        rep.stage("loading the base model")
        t = time.monotonic()
        tuning = load_model(config, method, params, objective, objective_params, rep, parent)
        durations["load"] = _since(t)

        schedule = plan(config, len(data.train_ds), method)
        if here.main:
            clear_run_dir(config.output)
        rep.stage("training")
        outcome = train(config, data, tuning, schedule, rep, trackers, here)
        durations["train"] = round(outcome.seconds, 3)
        if not here.main:
            return TrainResult(config.output, None, tuning.model, data.tokenizer)
        if outcome.gathered is not None:
            tuning = unshard(config, tuning, outcome.gathered, rep, outcome.device)

        meta = save_adapter(config, data, tuning)
        report = build_report(config, data, tuning, schedule, outcome, meta, durations, here)
        write_report(config.output, report)
        write_step_metrics(config.output, report)
        plot_losses(report, config.output / "loss.png")

        if data.split.test and outcome.stop_reason != "interrupted":
            rep.stage("evaluating on the test split, base and tuned")
            t = time.monotonic()
            report["test"], report["samples"] = evaluate(config, data, tuning, evaluators, rep)
            durations["evaluate"] = _since(t)
        durations["total"] = _since(started)
        write_report(config.output, report)
        trackers.end(report, config.output)
    return TrainResult(config.output, report, tuning.model, data.tokenizer)


def check_output(run_dir: Path, overwrite: bool) -> None:
    """Refuse to train over another run, unless told to: before any data is read."""
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise AdapterdeckError(f"output directory {run_dir} is not empty; choose another or pass --overwrite")


def load_model(
    config: RunConfig,
    method: TuningMethod,
    params: MethodParams,
    objective: TrainingObjective,
    objective_params: ObjectiveParams,
    rep: Reporter,
    parent: Parent | None = None,
) -> Tuning:
    """Load the base at the chosen precision and put the method's adapter on it, seeded (with
    ``parent``'s weights when the run continues from it)."""
    import torch
    from transformers import set_seed

    precision = choose_precision(config.train.dtype)
    rep.note(precision.describe())
    # Seed before the adapter's weights are created: the same config gives the same run.
    set_seed(config.train.seed)
    base = method.load_base(config.base, params, dtype=getattr(torch, precision.load))
    model = method.apply(base, params)
    if parent is not None:
        load_parent_weights(model, parent)
    trainable, total = model.get_nb_trainable_parameters()
    prompt_learning = any(c.is_prompt_learning for c in model.peft_config.values())
    # Packing is exact only without a KV cache in the forward pass; prompt learning adds one.
    packing = config.train.packing and not prompt_learning
    rep.note(
        f"{method.name}: {trainable:,} trainable parameters of {total:,}; "
        f"packing {'on' if packing else 'off'}"
    )
    return Tuning(
        method, params, objective, objective_params, base, model, precision, packing, trainable, total,
        parent,
    )  # fmt: skip


def unshard(
    config: RunConfig, tuning: Tuning, weights: dict[str, Any], rep: Reporter, device: str = "cpu"
) -> Tuning:
    """The tuned model whole again, from the weights FSDP gathered: the base loaded afresh, the
    method's adapter on it, and the trained weights (the best checkpoint's) put in."""
    import torch

    rep.note("adapter gathered from the processes' shards")
    base = tuning.method.load_base(config.base, tuning.params, dtype=getattr(torch, tuning.precision.load))
    model = tuning.method.apply(base, tuning.params)
    wanted = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name in wanted if name not in weights]
    if missing:
        raise AdapterdeckError(f"FSDP gathered none of {len(missing)} adapter tensors ({missing[0]} ...)")
    model.load_state_dict({name: weights[name] for name in wanted}, strict=False)
    if next(model.parameters()).device != torch.device(device):  # a quantized base is placed already
        model.to(device)
    return replace(tuning, base=base, model=model)


def plan(config: RunConfig, train_examples: int, method: TuningMethod) -> Schedule:
    """How many steps, how often to validate, and at what learning rate."""
    bs, ga = config.train.batch_size, config.train.gradient_accumulation
    steps_per_epoch = max(1, math.ceil(train_examples / (bs * ga)))
    total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * steps_per_epoch))
    eval_steps = config.train.eval_steps or max(1, total_steps // 10)
    return Schedule(total_steps, eval_steps, config.train.learning_rate or method.default_learning_rate)


def clear_run_dir(run_dir: Path) -> None:
    """Create the run directory and remove what an earlier run left in it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in STALE:
        target = run_dir / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def training_arguments(
    config: RunConfig, schedule: Schedule, tuning: Tuning, here: World | None = None
) -> dict[str, Any]:
    """The Trainer's arguments (``TrainingArguments`` keywords): validate and checkpoint every
    ``eval_steps``, keep the best; in ``here.size`` processes, each with its share of the batch."""
    import torch

    train, precision = config.train, tuning.precision
    here = here or World()
    batch = per_process_batch(train.batch_size, here.size)
    cpu = not torch.cuda.is_available()
    extra: dict[str, Any] = {}
    if here.distributed:
        # gloo on CPUs; a process that waits longer than this for the others fails the run.
        extra.update(ddp_timeout=train.collective_timeout, ddp_find_unused_parameters=False)
        if cpu:
            extra["ddp_backend"] = "gloo"
        if train.strategy != "ddp":
            # FSDP and DeepSpeed checkpoint the optimizer beside the (adapter-only) weights, and
            # the Trainer loads the best checkpoint back only from such a one.
            sharded = fsdp_arguments() if train.strategy == "fsdp" else deepspeed_arguments()
            extra.update(sharded, save_only_model=False)
    return dict(
        output_dir=str(config.output / "checkpoints"),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        gradient_accumulation_steps=train.gradient_accumulation,
        learning_rate=schedule.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=schedule.total_steps,
        warmup_steps=math.ceil(train.warmup_ratio * schedule.total_steps),
        weight_decay=train.weight_decay,
        lr_scheduler_type=train.lr_scheduler,
        logging_steps=min(train.logging_steps, schedule.eval_steps),
        eval_strategy="steps",
        eval_steps=schedule.eval_steps,
        save_strategy="steps",
        save_steps=schedule.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=train.seed,
        data_seed=train.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        include_num_input_tokens_seen="non_padding" if not tuning.packing else "all",
        use_cache=False,
        bf16=precision.autocast == "bfloat16",
        fp16=precision.autocast == "float16",
        # transformers refuses bf16/fp16 without a GPU unless told the CPU is meant; accelerate
        # joins a multi-process run on CPUs (gloo) only when told so too.
        use_cpu=cpu and (precision.autocast is not None or here.distributed),
        **{"save_only_model": True, **extra},
    )


def build_trainer(
    config: RunConfig,
    data: RunData,
    tuning: Tuning,
    arguments: dict[str, Any],
    rep: Reporter,
    stop: dict[str, bool],
    trackers: RunTrackers,
) -> Trainer:
    """The objective's trainer, reporting to ``rep`` and ``trackers``, stopping early as configured
    and when ``stop`` asks."""
    from transformers import EarlyStoppingCallback, PrinterCallback

    callbacks = [trainer_callback(rep, stop), *trackers.callbacks()]
    if config.early_stopping.patience:
        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=config.early_stopping.patience,
                early_stopping_threshold=config.early_stopping.min_delta,
            )
        )
    if world().distributed:
        callbacks.append(stop_together())  # last: the main process's decision, everywhere
    tuning.model.config.use_cache = False
    parts = TrainerParts(
        config, data, tuning.model, tuning.base, data.tokenizer, tuning.method, tuning.params,
        arguments, callbacks, tuning.packing,
    )  # fmt: skip
    trainer = tuning.objective.build_trainer(parts, tuning.objective_params)
    trainer.remove_callback(PrinterCallback)  # progress is shown by the reporter, not as raw dicts
    return trainer


def train(
    config: RunConfig,
    data: RunData,
    tuning: Tuning,
    schedule: Schedule,
    rep: Reporter,
    trackers: RunTrackers,
    here: World | None = None,
) -> Outcome:
    """Train until done, early-stopped or Ctrl-C; the best checkpoint's weights are loaded back."""
    arguments = training_arguments(config, schedule, tuning, here)
    t = time.monotonic()
    with Interrupts(rep) as stop:
        trainer = build_trainer(config, data, tuning, arguments, rep, stop, trackers)
        if "fsdp" in arguments and not trainer.is_fsdp_enabled:
            raise AdapterdeckError(FSDP_NEEDS_ACCELERATORS)
        # A continued run starts where its parent ended: measured, so the report can show it.
        start = trainer.evaluate()["eval_loss"] if tuning.parent is not None else None
        trainer.train()
        # Under FSDP each process holds a shard of each layer: every one sends its shards to the
        # main process, which puts the weights into a model of its own for saving and evaluating.
        gathered = gather_trained(trainer.model) if trainer.is_fsdp_enabled else None
        device = str(trainer.args.device)
        # Under mixed precision the Trainer wrapped the model's forward in autocast; evaluation,
        # export and the returned model run at the weights' own precision, as a reloaded adapter does.
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    seconds = time.monotonic() - t
    state = trainer.state
    if stop["requested"]:
        stop_reason = "interrupted"
    elif state.global_step < schedule.total_steps:
        stop_reason = "early_stopping"
    else:
        stop_reason = "completed"
    return Outcome(state, stop_reason, seconds, start, gathered, device)


def save_adapter(config: RunConfig, data: RunData, tuning: Tuning) -> dict[str, Any]:
    """Write ``adapter/`` (the PEFT files and what adapterdeck knows of them) whole or not at all."""
    tuning.model.config.use_cache = True
    run_dir = config.output
    tmp_adapter = run_dir / ".adapter.tmp"
    shutil.rmtree(tmp_adapter, ignore_errors=True)
    # An objective may have added adapters of its own (DPO's frozen reference copy): the run's
    # adapter is the one trained.
    trained = tuning.model.active_adapter
    for name in [n for n in tuning.model.peft_config if n != trained]:
        tuning.model.delete_adapter(name)
    tuning.model.save_pretrained(tmp_adapter)
    meta = {
        "method": tuning.method.name,
        "params": tuning.params.model_dump(mode="json"),
        "objective": {
            "name": tuning.objective.name,
            "params": tuning.objective_params.model_dump(mode="json"),
        },
        "served_by": list(tuning.method.served_by),
        "base": config.base,
        "base_fingerprint": fingerprint(config.base),
        "data_sha256": data.sha256,
        "format": data.reports[0].format,
        "adapterdeck_version": __version__,
    }
    if tuning.parent is not None:
        meta["parent"] = {"ref": tuning.parent.ref}
    (tmp_adapter / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_adapter, run_dir / "adapter")
    return meta


def evaluate(
    config: RunConfig, data: RunData, tuning: Tuning, evaluators: list[Evaluator], rep: Reporter
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score the base (zero- and few-shot) and the tuned model on the test split: the report's
    ``test`` section and its side-by-side samples."""
    model = tuning.model
    shots = pick_shots(data.split.train, config.eval.base_shots, config.train.seed)
    cache = (
        open_cache(config.base, model, f"{tuning.method.name}, as trained")
        if config.eval.cache_base
        else None
    )
    result = compare(
        model,
        data.tokenizer,
        data.split.test,
        evaluators,
        base_context=model.disable_adapter,
        shots=shots,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size,
        samples=config.eval.samples,
        progress=rep.progress,
        base_cache=cache,
    )
    if result.cached:
        rep.note(f"base outputs read back from the cache ({default_cache_dir()}): {', '.join(result.cached)}")
    test = {
        "examples": len(data.split.test),
        "base_shots": len(shots),
        "shot_lines": [c.line for c in shots],
        "metrics": result.metrics,
        "verdict": prompt_verdict(result.metrics, evaluators),
        "base_cached": result.cached,  # base runs read back from the cache, not generated again
    }
    return test, result.samples


def _since(t: float) -> float:
    return round(time.monotonic() - t, 3)
