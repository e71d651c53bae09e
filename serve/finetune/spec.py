"""A fine-tuning job as a training run: its hyperparameters resolved ("auto" or not) and the
``adapterdeck train`` run config it stands for. The HTTP API checks a job with it before queueing
it (``check_job_config``); the training child builds its run from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterdeck.core.errors import AdapterdeckError

AUTO = "auto"
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 8
DEFAULT_BETA = 0.1  # dpo's, as DpoParams has it
MIN_TRAINING_EXAMPLES = 10


def resolve_hyperparameters(
    requested: dict[str, Any], examples: int, default_lr: float, processes: int = 1
) -> dict[str, Any]:
    """Concrete values for ``n_epochs``, ``batch_size`` and ``learning_rate_multiplier`` ("auto" or not).

    auto: 3 epochs; a batch of 8, or a tenth of the examples for smaller files, rounded up to a
    multiple of ``processes`` (each trains on an equal share); the method's own learning rate
    (multiplier 1); for a DPO job (``beta`` among them), beta 0.1.
    """
    epochs = requested.get("n_epochs", AUTO)
    batch = requested.get("batch_size", AUTO)
    multiplier = requested.get("learning_rate_multiplier", AUTO)
    resolved = {
        "n_epochs": DEFAULT_EPOCHS if epochs == AUTO else int(epochs),
        "batch_size": -(-min(DEFAULT_BATCH_SIZE, max(1, examples // 10)) // processes) * processes
        if batch == AUTO
        else int(batch),
        "learning_rate_multiplier": 1.0 if multiplier == AUTO else float(multiplier),
        "learning_rate": default_lr * (1.0 if multiplier == AUTO else float(multiplier)),
    }
    if "beta" in requested:
        resolved["beta"] = DEFAULT_BETA if requested["beta"] == AUTO else float(requested["beta"])
    return resolved


def objective_config(objective: dict[str, Any] | None, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The run config's ``objective``: the job's (sft when it has none), with a DPO job's beta."""
    config = dict(objective or {"name": "sft"})
    if "beta" in hyperparameters:
        config["beta"] = hyperparameters["beta"]
    return config


def log_config(integrations: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The run config's ``log``: each of OpenAI's integrations (``{"type": T, T: {...}}``) as tracker
    T with those parameters."""
    return {i["type"]: dict(i.get(i["type"]) or {}) for i in integrations or []}


def run_config(
    *,
    base: str,
    adapter_method: dict[str, Any],
    evaluators: list[str],
    hyperparameters: dict[str, Any],
    seed: int,
    objective: dict[str, Any] | None = None,
    init_adapter: str | None = None,
    integrations: list[dict[str, Any]] | None = None,
    train: Path,
    validation: Path | None,
    output: Path,
) -> dict[str, Any]:
    """The ``adapterdeck train`` run config of a job (``hyperparameters`` already resolved); a job
    that continues a fine-tuned model has its version as ``init_adapter``."""
    data: dict[str, Any] = {"train": str(train)}
    if validation is not None:
        data["validation"] = str(validation)
    extra = {"init_adapter": init_adapter} if init_adapter else {}
    return {
        **extra,
        "base": base,
        "data": data,
        "method": dict(adapter_method),
        "objective": objective_config(objective, hyperparameters),
        "train": {
            "epochs": hyperparameters["n_epochs"],
            "batch_size": hyperparameters["batch_size"],
            "learning_rate": hyperparameters["learning_rate"],
            "seed": seed,
        },
        "eval": {"evaluators": list(evaluators), "samples": 3},
        "output": str(output),
        "log": log_config(integrations),
    }


def check_job_config(
    *,
    base: str,
    adapter_method: dict[str, Any],
    evaluators: list[str],
    hyperparameters: dict[str, Any],
    objective: dict[str, Any] | None = None,
    integrations: list[dict[str, Any]] | None = None,
) -> None:
    """Raise ``AdapterdeckError`` naming the key when the method, its parameters, the evaluators,
    the hyperparameters or the integrations would not make a valid run config."""
    from adapterdeck.core.config import parse_config
    from adapterdeck.core.plugins import catalog

    name = adapter_method.get("name")
    plugins = catalog()
    if name not in plugins.methods:
        raise AdapterdeckError(f"adapterdeck.method: {plugins.unknown('method', str(name), failures=False)}")
    for i, evaluator in enumerate(evaluators):
        if evaluator not in plugins.evaluators:
            unknown = plugins.unknown("evaluator", evaluator, failures=False)
            raise AdapterdeckError(f"adapterdeck.evaluators.{i}: {unknown}")
    resolved = resolve_hyperparameters(hyperparameters, 100, plugins.method(str(name)).default_learning_rate)
    config = run_config(
        base=base,
        adapter_method=adapter_method,
        evaluators=evaluators,
        hyperparameters=resolved,
        seed=0,
        objective=objective,
        integrations=integrations,
        train=Path("train.jsonl"),
        validation=None,
        output=Path("run"),
    )
    parse_config(config, "adapterdeck")
