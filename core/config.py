"""The run config of ``adapterdeck train``: YAML validated by pydantic.

An unknown or mistyped key is an error naming the key and where it is
(``data.fromat``), found before any model is loaded. A user with only a base model
and a JSONL file gets a good LoRA run from the defaults.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapterdeck.core.continued import tenant_problem
from adapterdeck.core.dataset import DEFAULT_MAX_LINE_BYTES
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.methods import MethodParams
from adapterdeck.core.objectives import ObjectiveParams, data_kind_problem
from adapterdeck.core.plugins import Catalog, catalog
from adapterdeck.core.trackers import TrackerParams

DEFAULT_METHOD = "lora"
DEFAULT_OBJECTIVE = "sft"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ``data.mix.file: builtin:general`` names the general-purpose chat data shipped with adapterdeck.
BUILTIN_MIX = "builtin:general"


def builtin_mix_file() -> Path:
    """The 300 general-purpose chat examples shipped for ``data.mix`` (disjoint from the general probes)."""
    from importlib import resources

    return Path(str(resources.files("adapterdeck.core").joinpath("data/general_mix.jsonl")))


class MixConfig(Strict):
    """General-purpose data mixed into training to limit catastrophic forgetting."""

    file: Path = Field(description=f"a JSONL file, or {BUILTIN_MIX!r} for the shipped general data")
    ratio: float = Field(0.1, gt=0, lt=1, description="share of the training examples taken from `file`")
    format: str | None = None

    @field_validator("file", mode="before")
    @classmethod
    def _builtin(cls, v: Any) -> Any:
        return builtin_mix_file() if str(v) == BUILTIN_MIX else v


class DataConfig(Strict):
    train: list[Path] = Field(
        min_length=1, description="training file(s); split unless validation/test given"
    )
    format: str | None = Field(None, description="data format; detected per file when omitted ('auto')")
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    validation: list[Path] | None = None
    test: list[Path] | None = None
    mix: MixConfig | None = None
    max_line_bytes: int = Field(
        DEFAULT_MAX_LINE_BYTES,
        ge=1,
        description="longest line of a data file, in bytes; longer lines are errors",
    )

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | Path) else v

    @field_validator("format", mode="before")
    @classmethod
    def _auto(cls, v: Any) -> Any:
        return None if v == "auto" else v

    @field_validator("split")
    @classmethod
    def _ratios(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in v) or abs(sum(v) - 1) > 1e-6:
            raise ValueError("three non-negative ratios (train, validation, test) that sum to 1")
        return v


class MethodConfig(BaseModel):
    """``name`` picks a method plugin; the other keys are its parameters."""

    model_config = ConfigDict(extra="allow")
    name: str = DEFAULT_METHOD


class ObjectiveConfig(BaseModel):
    """``name`` picks an objective plugin; the other keys are its parameters (``beta`` for dpo)."""

    model_config = ConfigDict(extra="allow")
    name: str = DEFAULT_OBJECTIVE


class TrainConfig(Strict):
    learning_rate: float | None = Field(None, gt=0, description="default: the method's")
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many steps (overrides epochs)")
    batch_size: int = Field(
        8, ge=1, description="examples per step, shared equally by the processes of a multi-process run"
    )
    gradient_accumulation: int = Field(1, ge=1)
    max_length: int | None = Field(None, ge=8, description="longest example in tokens; default: the base's")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: str = "linear"
    seed: int = 0
    eval_steps: int | None = Field(None, ge=1, description="validate every N steps; default: ~10 times a run")
    logging_steps: int = Field(5, ge=1)
    packing: bool = Field(True, description="padding-free packing of examples into each batch")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$")
    strategy: str = Field(
        "ddp",
        pattern="^(ddp|fsdp|deepspeed)$",
        description="how several processes share the work: ddp (data-parallel), fsdp, deepspeed",
    )
    collective_timeout: int = Field(
        600, ge=10, description="seconds a process waits for the others before the run fails"
    )


class EarlyStoppingConfig(Strict):
    patience: int | None = Field(3, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0)


class EvalConfig(Strict):
    evaluators: list[str] = Field(default_factory=lambda: ["loss", "exact_match"])
    samples: int = Field(5, ge=0, description="test prompts shown side by side in the report")
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(32, ge=1, description="examples per forward pass when evaluating")
    base_shots: int = Field(
        3, ge=0, description="solved training examples in the few-shot base's prompt (0: no few-shot base)"
    )
    cache_base: bool = Field(
        True, description="keep the base's outputs on disk and read them back in later runs on the same base"
    )


class RunConfig(Strict):
    base: str = Field(description="base model: a local model directory or a hub id")
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: Path = Path("runs/run")
    log: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="experiment trackers the run is logged to: {tracker: {its parameters}}",
    )
    publish: str | None = Field(
        None,
        pattern=r"^[^/\s:@]+/[^/\s:@]+(:[a-z][a-z0-9_-]*)?$",
        description="publish the adapter on success as tenant/name (tenant/name:alias also moves alias)",
    )
    init_adapter: str | None = Field(
        None,
        min_length=1,
        description="continue from this adapter: tenant/name@N, tenant/name:alias or a directory",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        for key in ("method", "objective"):
            if isinstance(values, dict) and isinstance(values.get(key), str):
                values = {**values, key: {"name": values[key]}}
        if isinstance(values, dict) and isinstance(values.get("log"), str):
            values = {**values, "log": {values["log"]: {}}}  # ``log: mlflow``: with its defaults
        if isinstance(values, dict) and isinstance(values.get("log"), dict):
            values = {**values, "log": {k: {} if v is None else v for k, v in values["log"].items()}}
        return values

    def method_params(self, plugins: Catalog | None = None) -> MethodParams:
        """The method's parameters, validated by the method's own model."""
        method = (plugins or catalog()).method(self.method.name)
        extra = dict(self.method.model_extra or {})
        return method.params.model_validate(extra)

    def objective_params(self, plugins: Catalog | None = None) -> ObjectiveParams:
        """The objective's parameters, validated by the objective's own model."""
        objective = (plugins or catalog()).objective(self.objective.name)
        return objective.params.model_validate(dict(self.objective.model_extra or {}))

    def tracker_params(self, name: str, plugins: Catalog | None = None) -> TrackerParams:
        """Tracker ``name``'s parameters (``log.<name>``), validated by the tracker's own model."""
        return (plugins or catalog()).tracker(name).params.model_validate(self.log[name])


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _suggest(loc: tuple[Any, ...], model: type[BaseModel]) -> str:
    fields: dict[str, Any] = model.model_fields
    target: type[BaseModel] | None = model
    for part in loc[:-1]:
        if target is None or not isinstance(part, str) or part not in target.model_fields:
            return ""
        annotation = target.model_fields[part].annotation
        args = getattr(annotation, "__args__", ())
        candidates = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        target = candidates[0] if candidates else None
    if target is None:
        return ""
    fields = target.model_fields
    key = str(loc[-1])
    close = difflib.get_close_matches(key, list(fields), n=1)
    close = close or [f for f in fields if key.startswith(f) or f.startswith(key)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format_errors(source: str, exc: ValidationError, model: type[BaseModel], prefix: tuple = ()) -> str:
    lines = []
    for e in exc.errors():
        loc = prefix + tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {_where(loc)}: unknown key{_suggest(tuple(e['loc']), model)}")
        elif e["type"] == "missing":
            lines.append(f"{source}: {_where(loc)}: required key is missing")
        else:
            lines.append(f"{source}: {_where(loc)}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config", base_dir: Path | None = None) -> RunConfig:
    """Validate a config mapping: every key known, every value of the right type, the method's too."""
    if not isinstance(data, dict):
        raise AdapterdeckError(f"{source}: expected a mapping of keys at the top level")
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise AdapterdeckError(_format_errors(source, exc, RunConfig)) from None
    plugins = catalog()
    if config.method.name not in plugins.methods:
        raise AdapterdeckError(f"{source}: method.name: {plugins.unknown('method', config.method.name)}")
    method = plugins.method(config.method.name)
    try:
        method_params = config.method_params(plugins)
    except ValidationError as exc:
        raise AdapterdeckError(_format_errors(source, exc, method.params, ("method",))) from None
    if config.objective.name not in plugins.objectives:
        raise AdapterdeckError(
            f"{source}: objective.name: {plugins.unknown('objective', config.objective.name)}"
        )
    objective = plugins.objective(config.objective.name)
    try:
        config.objective_params(plugins)
    except ValidationError as exc:
        raise AdapterdeckError(_format_errors(source, exc, objective.params, ("objective",))) from None
    refusal = objective.refuses(method, method_params)
    if refusal:
        raise AdapterdeckError(
            f"{source}: objective {objective.name!r} cannot train method {method.name!r}: {refusal}"
        )
    for i, name in enumerate(config.eval.evaluators):
        if name not in plugins.evaluators:
            raise AdapterdeckError(f"{source}: eval.evaluators.{i}: {plugins.unknown('evaluator', name)}")
    if config.init_adapter and (problem := tenant_problem(config.init_adapter, config.publish)):
        raise AdapterdeckError(f"{source}: init_adapter: {problem}")
    for name in config.log:
        if name not in plugins.trackers:
            raise AdapterdeckError(f"{source}: log.{name}: {plugins.unknown('tracker', name)}")
        try:
            config.tracker_params(name, plugins)
        except ValidationError as exc:
            raise AdapterdeckError(
                _format_errors(source, exc, plugins.tracker(name).params, ("log", name))
            ) from None
    fmt = config.data.format
    if fmt is not None and fmt not in plugins.formats:
        raise AdapterdeckError(f"{source}: data.format: {plugins.unknown('format', fmt)}")
    if fmt is not None and (problem := data_kind_problem(objective, fmt, plugins.format(fmt).kind)):
        raise AdapterdeckError(f"{source}: data.format: {problem}")
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def _resolve_paths(config: RunConfig, base_dir: Path) -> RunConfig:
    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base_dir / p)

    data = config.data
    data = data.model_copy(
        update={
            "train": [fix(p) for p in data.train],
            "validation": [fix(p) for p in data.validation] if data.validation else None,
            "test": [fix(p) for p in data.test] if data.test else None,
            "mix": data.mix.model_copy(update={"file": fix(data.mix.file)}) if data.mix else None,
        }
    )
    base = config.base
    if (base_dir / base).exists() and not Path(base).is_absolute():
        base = str(base_dir / base)
    init = config.init_adapter
    if init and (base_dir / init).exists() and not Path(init).is_absolute():
        init = str(base_dir / init)
    return config.model_copy(
        update={"data": data, "base": base, "output": fix(config.output), "init_adapter": init}
    )


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a YAML run config; relative paths are relative to the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AdapterdeckError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise AdapterdeckError(f"{path}:{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_config(data, str(path), path.parent.resolve())
