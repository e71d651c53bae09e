"""Training in several processes, for real: torch.distributed with gloo on this machine's CPUs.

``adapterdeck train --processes 2`` against one process on the same data, seed and batch (the same
validation loss within 5%, the same exact match); Ctrl-C stopping both copies after the same step
with a usable adapter; and a fine-tuning job trained by 2 processes, one of which is SIGKILLed
mid-run: the job is requeued (nothing published), no process is left behind, and the retry
succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from adapterdeck.core.demo import demo_config, write_demo_dataset
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.finetune import FineTuning
from adapterdeck.serve.finetune.worker import Worker, device_group
from adapterdeck.serve.settings import FineTuneSettings

from .conftest import run_cli

# The relative difference of the best validation loss, 2 processes against 1: each process draws its
# own LoRA dropout masks and packs its own half of each batch, so the curves differ a little (2.3%
# after 48 steps on the tiny base, measured).
TOLERANCE = 0.05


def _config(base: Path, data: Path, out: Path, **train: Any) -> Path:
    config = demo_config(base, data, out)
    config["train"].update({"epochs": 2, "eval_steps": 4, "logging_steps": 2, "batch_size": 8, "seed": 3})
    config["train"].update(train)
    config["eval"] = {"evaluators": ["loss", "exact_match"], "samples": 2}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def _copies(agent: int) -> list[psutil.Process]:
    """The training copies an agent started (its children), alive."""
    try:
        return [p for p in psutil.Process(agent).children(recursive=True) if p.is_running()]
    except psutil.NoSuchProcess:
        return []


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


@pytest.fixture(scope="module")
def support(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "support.jsonl", task="support", n=240)


def test_two_processes_train_as_one_does(base_model: Path, support: Path, tmp_path: Path) -> None:
    one = run_cli("train", str(_config(base_model, support, tmp_path / "one")))
    assert one.returncode == 0, one.stderr
    two = run_cli("train", str(_config(base_model, support, tmp_path / "two")), "--processes", "2")
    assert two.returncode == 0, two.stderr
    r1, r2 = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two"))
    t1, t2 = r1["training"], r2["training"]
    assert (t1["processes"], t1["strategy"], t2["processes"], t2["strategy"]) == (1, None, 2, "ddp")
    # The same batches (each process half of each), so the same steps and tokens.
    assert t1["steps"] == t2["steps"] and t1["tokens_seen"] == t2["tokens_seen"]
    gap = abs(t2["best_val_loss"] - t1["best_val_loss"]) / t1["best_val_loss"]
    print(
        f"best validation loss: 1 process {t1['best_val_loss']:.4f}, 2 processes {t2['best_val_loss']:.4f} "
        f"({gap:.2%} apart); tokens/s {t1['tokens_per_second']} and {t2['tokens_per_second']}"
    )
    assert gap < TOLERANCE
    m1, m2 = r1["test"]["metrics"], r2["test"]["metrics"]
    assert m1["exact_match"]["tuned"]["value"] == m2["exact_match"]["tuned"]["value"]
    assert m2["loss"]["tuned"]["value"] == pytest.approx(m1["loss"]["tuned"]["value"], rel=TOLERANCE)
    # One process spoke and wrote: the progress once, one adapter, one report.
    assert two.stdout.count("step 4:") == 1 and two.stdout.count("report:") == 1
    assert "2 processes (ddp), this is the main one" in two.stdout
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
    # Early stopping: one decision (the main process's), so both stop after the same evaluation.
    early = _config(base_model, support, tmp_path / "early")
    early_stop = ["--set", "early_stopping.patience=1", "--set", "early_stopping.min_delta=100"]
    stopped = run_cli("train", str(early), "--processes", "2", *early_stop)
    assert stopped.returncode == 0, stopped.stderr
    training = json.loads((tmp_path / "early" / "report.json").read_text())["training"]
    assert training["stop_reason"] == "early_stopping" and training["steps"] == 8, training["steps"]
    # A batch the processes cannot share equally is refused with one line, once.
    odd = run_cli(
        "train", str(_config(base_model, support, tmp_path / "odd", batch_size=7)), "--processes", "2"
    )
    assert odd.returncode != 0
    assert odd.stderr.count("train.batch_size 7 cannot be shared equally by 2 processes") == 1, odd.stderr
    assert not (tmp_path / "odd" / "adapter").exists()


def test_ctrl_c_stops_every_process_after_the_same_step(
    base_model: Path, support: Path, tmp_path: Path
) -> None:
    config = _config(base_model, support, tmp_path / "run", epochs=200)
    env = {**os.environ, "COLUMNS": "200"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "adapterdeck.core.cli", "train", str(config), "--processes", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(agent.stdout or []), daemon=True)
    reader.start()
    try:
        _wait(lambda: any("step 8:" in line for line in lines), 300, "training to reach step 8")
        copies = _copies(agent.pid)
        assert len(copies) == 2, copies
        agent.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal does: the agent alone gets it
        assert agent.wait(timeout=150) == 130
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    reader.join(timeout=10)
    assert not [p for p in copies if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "interrupted" and report["training"]["stop_reason"] == "interrupted"
    assert 8 <= report["training"]["steps"] < report["training"]["planned_steps"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_job_in_two_processes_survives_a_killed_process(base_model: Path, tmp_path: Path) -> None:
    """A worker in this process, on a real SQLite registry, training each job in 2 processes."""
    registry = Registry(RegistrySettings(home=tmp_path / "home"))
    try:
        ft = FineTuning(registry)
        data = write_demo_dataset(tmp_path / "support.jsonl", task="support", n=80)
        file = ft.add_file("acme", data.name, "fine-tune", path=data, format="chat", examples=80)
        job = ft.create_job(
            "acme", model="tiny", base=str(base_model), training_file=file.id, validation_file=None,
            suffix=None, seed=0, hyperparameters={"n_epochs": 6}, adapter_method={"name": "lora"},
            evaluators=["loss"], metadata=None, max_attempts=2,
        )  # fmt: skip
        ft.files_validated(job.id, {})
        settings = FineTuneSettings(heartbeat_seconds=0.5, devices_per_job=2)
        worker = Worker(registry, settings, worker_id="test:1")

        # Attempt 1: one of the two processes is SIGKILLed once training is under way.
        claimed = ft.claim_next(worker.worker_id, 30)
        assert claimed is not None
        running = threading.Thread(target=worker.run_job, args=(claimed,))
        running.start()

        def trained_a_step() -> bool:
            return any(e.type == "metrics" for e in ft.list_events(job.id, limit=100).items)

        _wait(trained_a_step, 300, "the first metrics event")
        agents = [
            p
            for p in psutil.Process().children()
            if "adapterdeck.serve.finetune.child" in " ".join(p.cmdline())
        ]
        assert len(agents) == 1, agents
        copies = _copies(agents[0].pid)
        assert len(copies) == 2, copies
        victim = next(p for p in copies if p.environ().get("RANK") == "1")
        victim.kill()
        running.join(timeout=150)
        assert not running.is_alive()
        requeued = ft.get_job(job.id, "acme")
        messages = [e.message for e in ft.list_events(job.id, limit=100).items]
        assert requeued.status == "queued", (requeued.status, messages[:5])
        assert any(
            "training process 1 of 2 died of SIGKILL; job requeued after attempt 1 of 2" in m
            for m in messages
        )
        assert registry.list("acme") == []  # nothing half-written was published
        assert not [p for p in [agents[0], *copies] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

        # Attempt 2 runs to the end, in 2 processes.
        claimed = ft.claim_next(worker.worker_id, 30)
        assert claimed is not None and claimed.id == job.id and claimed.attempts == 2
        worker.run_job(claimed)
        done = ft.get_job(job.id, "acme")
        assert done.status == "succeeded", done.error
        messages = [e.message for e in ft.list_events(job.id, limit=200).items]
        assert any("(2 data-parallel processes)" in m for m in messages)
        assert len(registry.list("acme")) == 1
    finally:
        registry.close()


def test_strategies_and_device_groups_that_cannot_run_are_refused(
    base_model: Path, support: Path, tmp_path: Path
) -> None:
    for strategy, says in (
        ("fsdp", "train.strategy fsdp needs GPUs"),
        ("deepspeed", "train.strategy deepspeed needs the deepspeed package"),
    ):
        config = _config(base_model, support, tmp_path / strategy, strategy=strategy)
        refused = run_cli("train", str(config), "--processes", "2")
        assert refused.returncode != 0 and refused.stderr.count(says) == 1, refused.stderr
        assert not (tmp_path / strategy / "adapter").exists()
    assert device_group(FineTuneSettings(devices=["0", "1", "2", "3"], devices_per_job=2), 1) == ["2", "3"]
    with pytest.raises(AdapterdeckError, match=r"worker 1 has 1 of the 2 finetune\.devices_per_job asks for"):
        device_group(FineTuneSettings(devices=["0", "1", "2"], devices_per_job=2), 1)
    assert device_group(FineTuneSettings(devices_per_job=2), 0) is None  # the CPU: any number


def test_fsdp_arguments_and_unsharding(base_model: Path, support: Path, tmp_path: Path) -> None:
    """What of FSDP can be checked on CPUs. accelerate shards with FSDP only on accelerators (above:
    refused on CPUs), so the sharded training itself does not run here; these are the two ends
    adapterdeck adds to it: the Trainer's FSDP configuration, and the adapter put whole into a
    fresh model from the gathered weights, which the main process saves and evaluates."""
    import torch
    from transformers import TrainingArguments

    from adapterdeck.core.config import load_config
    from adapterdeck.core.distributed import World
    from adapterdeck.core.plugins import catalog
    from adapterdeck.core.progress import Reporter
    from adapterdeck.core.train import load_model, plan, training_arguments, unshard

    config = load_config(_config(base_model, support, tmp_path / "run", strategy="fsdp"))
    plugins = catalog()
    method, objective = plugins.method(config.method.name), plugins.objective(config.objective.name)
    params, objective_params = config.method_params(plugins), config.objective_params(plugins)
    tuning = load_model(config, method, params, objective, objective_params, Reporter())
    schedule = plan(config, 192, method)

    fsdp = training_arguments(config, schedule, tuning, World(0, 2, 0))
    assert fsdp["per_device_train_batch_size"] == 4 and not fsdp["save_only_model"]  # the best reloads
    assert training_arguments(config, schedule, tuning)["save_only_model"]  # one process: no FSDP
    zero = config.model_copy(update={"train": config.train.model_copy(update={"strategy": "deepspeed"})})
    deepspeed = training_arguments(zero, schedule, tuning, World(0, 2, 0))
    assert deepspeed["deepspeed"]["zero_optimization"]["stage"] == 2 and "fsdp" not in deepspeed
    assert not deepspeed["save_only_model"]
    # transformers takes the configuration as it is (the Trainer builds accelerate's plugin from it).
    given = {"fsdp": fsdp["fsdp"], "fsdp_config": fsdp["fsdp_config"]}
    plugin = TrainingArguments(output_dir=str(tmp_path / "args"), **given).fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and plugin["reshard_after_forward"]

    # Trained weights, as the processes' shards gathered would give them: the adapter's alone.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tuning.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    gathered = {n: p.detach().clone() for n, p in tuning.model.named_parameters() if p.requires_grad}
    assert 0 < len(gathered) < len(dict(tuning.model.named_parameters()))
    whole = unshard(config, tuning, gathered, Reporter()).model
    assert whole is not tuning.model
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    whole.eval(), tuning.model.eval()  # no dropout
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, tuning.model(input_ids=ids).logits)
    first = next(iter(gathered))
    with pytest.raises(AdapterdeckError, match=r"FSDP gathered none of 1 adapter tensors"):
        unshard(config, tuning, {n: w for n, w in gathered.items() if n != first}, Reporter())
