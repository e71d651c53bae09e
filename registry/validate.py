"""Everything checked before an adapter version becomes visible. A refusal lists every reason.

Checks: the directory holds a PEFT config PEFT can read and safetensors weights whose header
parses, that hold at least one tensor, whose data is complete and whose tensors agree with the
config; the adapter was made for a base the registry knows (by fingerprint of its config,
vocabulary and chat template) and its tensors fit that base's layers; a LoRA meant for vLLM
follows vLLM's rules (rank within the maximum, no DoRA, no bias, no modules_to_save, only linear
layers the base has); size limits.

Everything in the directory is treated as hostile: only plain files with the names an adapter
has are accepted (no symbolic links, subdirectories or other names), and every file is read
through ``untrusted``: JSON files are size-capped and type-checked before anything reads a field,
and the safetensors header is checked against the file without trusting any length it claims.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from adapterdeck.core.adapters import ADAPTER_META, PEFT_CONFIG
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.formats import shown
from adapterdeck.core.methods import ENGINE_PEFT, ENGINE_VLLM, ENGINES
from adapterdeck.registry.refs import InvalidRef, parse_ref
from adapterdeck.registry.untrusted import file_name_problem, read_json_object, read_safetensors_header

WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
README = "README.md"  # PEFT's save_pretrained writes a model card
ADAPTER_FILES = (PEFT_CONFIG, WEIGHTS, ADAPTER_META, README)
PICKLED_WEIGHTS = "adapter_model.bin"  # refused with its own reason
MAX_REPORT_BYTES = 64 << 20  # a run's report.json (loss curves, samples)


class PublishRefused(AdapterdeckError):
    """The adapter was refused; ``reasons`` says every reason."""

    def __init__(self, source: str, reasons: list[str]) -> None:
        self.reasons = reasons
        listed = "\n".join(f"  - {r}" for r in reasons)
        super().__init__(f"refused {source}: {len(reasons)} problem(s):\n{listed}")


@dataclass(frozen=True)
class BaseRecord:
    id: int | None
    name: str
    fingerprint: str
    config: dict[str, Any]
    chat_template_sha256: str | None


@dataclass
class Candidate:
    """A validated adapter, ready to be stored."""

    directory: Path
    files: list[tuple[str, Path, int]]  # (name, local path, size)
    peft_config: dict[str, Any]
    peft_type: str
    method: str
    params: dict[str, Any]
    served_by: list[str]
    rank: int | None
    base: BaseRecord
    size_bytes: int
    dataset_sha256: str | None = None
    data_format: str | None = None
    metrics: dict[str, Any] | None = None
    library_versions: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] | None = None  # the run's whole report.json, kept with the version
    parent: str | None = None  # the tenant/name@N it was tuned from (a registry version only)


def locate(path: str | Path) -> tuple[Path, dict[str, Any] | None, list[str]]:
    """The adapter directory (``adapter/`` inside a run), the run's report if any, and what is wrong
    with that report."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterdeckError(f"{path} is not a directory")
    report, problems = None, []
    if (path / "adapter").is_dir():
        report_file = path / "report.json"
        if report_file.is_symlink() or (report_file.exists() and not report_file.is_file()):
            problems.append("report.json is not a regular file")
        elif report_file.exists():
            report, problem = read_json_object(report_file, MAX_REPORT_BYTES, allow_nan=True)
            problems += [problem] if problem else _report_problems(report or {})
        path = path / "adapter"
    return path, None if problems else report, problems


@lru_cache(maxsize=16)
def _linear_shapes(config_json: str) -> tuple[dict[str, tuple[int, int]], str | None]:
    """Linear layers of a base (name -> (in, out)) and its output head's name, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads(config_json)
    model_type = config.pop("model_type")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    head = model.get_output_embeddings()
    shapes, head_name = {}, None
    for name, module in model.named_modules():
        if module is head:
            head_name = name
        elif isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
    return shapes, head_name


def base_record_for(name: str) -> BaseRecord:
    """Describe a base model (local dir or hub id) by loading its config and tokenizer, not its weights."""
    from adapterdeck.core.basemodel import chat_template_sha256, fingerprint, load_config, load_tokenizer

    return BaseRecord(
        None, name, fingerprint(name), load_config(name).to_dict(), chat_template_sha256(load_tokenizer(name))
    )


def _got(value: Any) -> str:
    """A decoded JSON value as the user wrote it, cut short, for messages."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:36] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _config_problems(config: dict[str, Any]) -> list[str]:
    """Type errors in adapter_config.json that PEFT would only trip over when loading the adapter."""
    from peft.utils import PeftType

    found: list[str] = []
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PeftType.__members__:
        found.append(f"{PEFT_CONFIG}: peft_type {_got(peft_type)} is not an adapter type PEFT knows")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        found.append(f"{PEFT_CONFIG}: base_model_name_or_path must be a string, got {_got(base)}")
    if peft_type != "LORA":
        return found

    def names(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(m, str) for m in v)

    def table(of: Callable[[Any], bool]) -> Callable[[Any], bool]:
        return lambda v: v is None or (isinstance(v, dict) and all(map(of, v.values())))

    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("r", _is_positive_int, "a positive integer"),
        ("lora_alpha", _is_number, "a number"),
        ("target_modules", lambda v: isinstance(v, str) or (names(v) and bool(v)),
         "a list of module names or a regular expression"),
        ("lora_dropout", lambda v: v is None or (_is_number(v) and 0 <= v < 1), "a number from 0 to 1"),
        ("rank_pattern", table(_is_positive_int), "an object of positive integers"),
        ("alpha_pattern", table(_is_number), "an object of numbers"),
        ("bias", lambda v: v is None or v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
        ("use_dora", lambda v: v is None or isinstance(v, bool), "true or false"),
        ("modules_to_save", lambda v: v is None or names(v), "a list of module names"),
    ]  # fmt: skip
    for key, ok, expected in checks:
        value = config.get(key)
        if not ok(value):
            found.append(f"{PEFT_CONFIG}: {key} must be {expected}, got {_got(value)}")
    return found


def _meta_problems(meta: dict[str, Any]) -> list[str]:
    """Type errors in adapterdeck.json: every field it has is used as it is."""
    found: list[str] = []
    for key in ("method", "base", "base_fingerprint", "data_sha256", "format", "adapterdeck_version"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            found.append(f"{ADAPTER_META}: {key} must be a string, got {_got(meta[key])}")
    if meta.get("params") is not None and not isinstance(meta["params"], dict):
        found.append(f"{ADAPTER_META}: params must be an object, got {_got(meta['params'])}")
    served_by = meta.get("served_by")
    if served_by is not None and not (
        isinstance(served_by, list) and all(isinstance(e, str) and e in ENGINES for e in served_by)
    ):
        found.append(
            f"{ADAPTER_META}: served_by must be a list of {', '.join(ENGINES)}, got {_got(served_by)}"
        )
    return found


def _report_problems(report: dict[str, Any]) -> list[str]:
    """Type errors in the fields of a run's report.json that a version records."""
    found: list[str] = []
    for key in ("data", "test", "versions"):
        if report.get(key) is not None and not isinstance(report[key], dict):
            found.append(f"report.json: {key} must be an object, got {_got(report[key])}")
    if found:
        return found
    data, test = report.get("data") or {}, report.get("test") or {}
    for key in ("sha256", "format"):
        if data.get(key) is not None and not isinstance(data[key], str):
            found.append(f"report.json: data.{key} must be a string, got {_got(data[key])}")
    if test.get("metrics") is not None and not isinstance(test["metrics"], dict):
        found.append(f"report.json: test.metrics must be an object, got {_got(test['metrics'])}")
    if not all(isinstance(v, str) for v in (report.get("versions") or {}).values()):
        found.append("report.json: versions must map library names to version strings")
    return found


def _lora_problems(
    config: dict[str, Any], tensors: dict[str, Any], base: BaseRecord, max_rank: int
) -> tuple[list[str], list[str]]:
    """What makes a LoRA unusable by any engine (tensors that do not fit the base or the config), and
    what only vLLM refuses."""
    broken: list[str] = []
    problems: list[str] = []
    r = int(config.get("r", 0))
    ranks = [r, *[int(v) for v in (config.get("rank_pattern") or {}).values()]]
    if max(ranks) > max_rank:
        problems.append(f"rank {max(ranks)} is above the registry's maximum of {max_rank} (max_lora_rank)")
    if config.get("use_dora"):
        problems.append("uses DoRA (use_dora: true), which vLLM does not serve")
    if config.get("bias", "none") != "none":
        problems.append(f"trains biases (bias: {config.get('bias')!r}), which vLLM does not serve")
    if config.get("modules_to_save"):
        problems.append(f"has modules_to_save {config['modules_to_save']}, which vLLM does not serve")
    shapes, head = _linear_shapes(json.dumps(base.config, sort_keys=True, default=str))
    seen_missing: list[str] = []
    for key, info in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            if "lora_magnitude_vector" not in key:  # DoRA, reported above
                problems.append(f"tensor {shown(key, 100)} is not a LoRA A/B matrix")
            continue
        part = "A" if ".lora_A." in key else "B"
        module = key.split(f".lora_{part}.")[0].removeprefix(PEFT_PREFIX)
        if module == head or module.endswith(f".{head}"):
            problems.append(f"targets the output layer {module}, which vLLM does not serve")
            continue
        if module not in shapes:
            if len(seen_missing) < 5 and module not in seen_missing:
                seen_missing.append(module)
            continue
        fan_in, fan_out = shapes[module]
        shape = list(info["shape"])
        rank = shape[0] if part == "A" else (shape[1] if len(shape) > 1 else None)
        expected = [rank, fan_in] if part == "A" else [fan_out, rank]
        if shape != expected:
            broken.append(f"{key} has shape {shape}; the base's {module} needs {expected}")
        elif rank not in ranks:
            broken.append(f"{key} has rank {rank}, but adapter_config.json says r={r}")
    for module in seen_missing:
        problems.append(f"targets {shown(module, 100)}, which is not a linear layer of the base")
    if not any(".lora_A." in k for k in tensors):
        broken.append("has no LoRA weights")
    return broken, problems


def _listing(directory: Path) -> tuple[dict[str, Path], set[str], list[str]]:
    """The adapter's files by name, every name present, and what is wrong with the directory.

    Only regular files with an adapter's names are accepted; anything else (a symbolic link, a
    subdirectory, a device, an unexpected or unsafe name) is a reason to refuse, and is never read.
    Hidden files with plain names (editor and OS droppings) are neither published nor read.
    """
    files: dict[str, Path] = {}
    present: set[str] = set()
    problems: list[str] = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        problem = file_name_problem(name)
        if not problem and name.startswith("."):
            continue
        present.add(name)
        if problem:
            problems.append(problem)
        elif entry.is_symlink():
            problems.append(f"{name} is a symbolic link; an adapter holds only regular files")
        elif entry.is_dir():
            problems.append(f"{name}/ is a directory; an adapter directory holds only files")
        elif not entry.is_file():
            problems.append(f"{name} is not a regular file")
        elif name == PICKLED_WEIGHTS:
            continue  # refused with what to do instead
        elif name not in ADAPTER_FILES:
            problems.append(
                f"unexpected file {shown(name)}; an adapter holds only {', '.join(ADAPTER_FILES)}"
            )
        else:
            files[name] = entry
    return files, present, problems


def validate(
    path: str | Path,
    *,
    find_base: Callable[[str], BaseRecord | None],
    known_bases: Callable[[], list[BaseRecord]],
    max_rank: int,
    max_bytes: int,
    base: str | None = None,
) -> Candidate:
    """Check an adapter (or run) directory; raise ``PublishRefused`` with every reason, or return it."""
    directory, report, reasons = locate(path)
    found, present, problems = _listing(directory)
    reasons.extend(problems)
    listed = [(name, p, p.stat().st_size) for name, p in sorted(found.items())]
    size = sum(s for _, _, s in listed)
    if size > max_bytes:
        reasons.append(f"the adapter is {size:,} bytes; the limit is {max_bytes:,}")
    if not present:
        reasons.append(f"{directory} is empty")
    config, config_ok, problems = _read_config(directory, found, present)
    reasons.extend(problems)
    meta, problems = _read_meta(found)
    reasons.extend(problems)
    tensors, problems = _read_weights(found, present)
    reasons.extend(problems)

    base_record: BaseRecord | None = None
    named = config.get("base_model_name_or_path")
    wanted = base or meta.get("base") or (named if isinstance(named, str) else None)
    fingerprint = None if base else meta.get("base_fingerprint")
    if not wanted and not fingerprint:
        if config_ok or PEFT_CONFIG not in found:  # else the unreadable config is the reason
            reasons.append("names no base model (adapter_config.json base_model_name_or_path); pass --base")
    else:
        base_record, problems = _match_base(wanted, fingerprint, find_base, known_bases)
        reasons.extend(problems)

    peft_type = str(config.get("peft_type", ""))
    usable = config_ok and peft_type == "LORA" and base_record is not None and bool(tensors)
    served_by, problems = _served_by(
        config, peft_type, meta, base_record if usable else None, tensors, max_rank
    )
    reasons.extend(problems)
    if reasons or base_record is None:
        raise PublishRefused(str(path), reasons or ["no base model could be determined"])
    return _candidate(directory, listed, config, peft_type, meta, served_by, base_record, report or {})


def _read_config(
    directory: Path, found: dict[str, Path], present: set[str]
) -> tuple[dict[str, Any], bool, list[str]]:
    """adapter_config.json (empty when missing), whether PEFT can use it, and what is wrong with it."""
    if PEFT_CONFIG not in found:
        return {}, False, [] if PEFT_CONFIG in present else [f"no {PEFT_CONFIG}"]
    loaded, problem = read_json_object(found[PEFT_CONFIG])
    problems = [problem] if problem else _config_problems(loaded or {})
    if not problems:
        try:
            from peft import PeftConfig

            PeftConfig.from_pretrained(str(directory))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            problems.append(f"{PEFT_CONFIG} is not a config PEFT can read: {first[:300]}")
    return loaded or {}, not problems, problems


def _read_meta(found: dict[str, Path]) -> tuple[dict[str, Any], list[str]]:
    """adapterdeck.json (empty when missing or wrong), and what is wrong with it."""
    if ADAPTER_META not in found:
        return {}, []
    loaded, problem = read_json_object(found[ADAPTER_META])
    problems = [problem] if problem else _meta_problems(loaded or {})
    return (loaded if loaded and not problems else {}), problems


def _read_weights(found: dict[str, Path], present: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The tensors of adapter_model.safetensors, and what is wrong with the weights."""
    if WEIGHTS in found:
        tensors, problems = read_safetensors_header(found[WEIGHTS])
        if not tensors and not problems:
            # PEFT loads such a file without complaint and serves the weights it initialised itself.
            problems = [f"{WEIGHTS} holds no tensors: the adapter has no trained weights"]
        if PICKLED_WEIGHTS in present:
            problems.append(f"unexpected file {PICKLED_WEIGHTS} (pickled weights); remove it")
        return tensors, problems
    if PICKLED_WEIGHTS in present:
        return {}, ["the weights are a pickle (adapter_model.bin); save them as adapter_model.safetensors"]
    return {}, [] if WEIGHTS in present else [f"no {WEIGHTS}"]


def _match_base(
    wanted: str | None,
    fingerprint: str | None,
    find_base: Callable[[str], BaseRecord | None],
    known_bases: Callable[[], list[BaseRecord]],
) -> tuple[BaseRecord | None, list[str]]:
    """The registry's record of the base the adapter names, or why it has none."""
    try:
        fresh = None
        if fingerprint is None:
            fresh = base_record_for(wanted)
            fingerprint = fresh.fingerprint
        record = find_base(fingerprint)
        if record is not None:
            return record, []
        registered = known_bases()
        # A concurrent publish may have recorded this very base since find_base looked.
        same = [b for b in registered if b.fingerprint == fingerprint]
        if same:
            return same[0], []
        if registered:
            names = ", ".join(f"{b.name} ({b.fingerprint[:19]})" for b in registered)
            return None, [
                f"was trained on another base ({wanted}, {fingerprint[:19]}); this registry serves {names}"
            ]
        # The first adapter of an empty registry defines its base.
        record = fresh or base_record_for(wanted)
        if record.fingerprint != fingerprint:
            return record, [f"the base {wanted} has changed since the adapter was trained on it"]
        return record, []
    except AdapterdeckError as exc:
        return None, [f"cannot check the base model: {exc}"]


def _served_by(
    config: dict[str, Any],
    peft_type: str,
    meta: dict[str, Any],
    lora_base: BaseRecord | None,
    tensors: dict[str, Any],
    max_rank: int,
) -> tuple[list[str], list[str]]:
    """The engines that serve the adapter, and what breaks it or what vLLM refuses of it.

    ``lora_base`` is given when the adapter is a readable LoRA with weights for a known base: only
    then are its tensors checked against that base and vLLM's rules.
    """
    served_by = list(meta.get("served_by") or [])
    problems: list[str] = []
    if lora_base is not None:
        broken, lora = _lora_problems(config, tensors, lora_base, max_rank)
        problems.extend(broken)
        if not served_by:  # a plain PEFT adapter: vLLM serves it if it follows vLLM's rules
            served_by = [ENGINE_PEFT] if lora else [ENGINE_VLLM, ENGINE_PEFT]
        elif ENGINE_VLLM in served_by:
            problems.extend(lora)
    elif ENGINE_VLLM in served_by and peft_type and peft_type != "LORA":
        problems.append(f"claims vLLM can serve it, but vLLM serves only LoRA adapters, not {peft_type}")
    return served_by or [ENGINE_PEFT], problems


def _candidate(
    directory: Path,
    listed: list[tuple[str, Path, int]],
    config: dict[str, Any],
    peft_type: str,
    meta: dict[str, Any],
    served_by: list[str],
    base: BaseRecord,
    report: dict[str, Any],
) -> Candidate:
    data = report.get("data") or {}
    test = report.get("test") or {}
    return Candidate(
        directory=directory,
        files=listed,
        peft_config=config,
        peft_type=peft_type,
        method=meta.get("method") or f"peft:{peft_type.lower()}",
        params=meta.get("params")
        or {k: v for k, v in config.items() if isinstance(v, int | float | str | bool)},
        served_by=served_by,
        rank=int(config["r"]) if peft_type == "LORA" and "r" in config else None,
        base=base,
        size_bytes=sum(s for _, _, s in listed),
        dataset_sha256=data.get("sha256") or meta.get("data_sha256"),
        data_format=data.get("format") or meta.get("format"),
        metrics=test.get("metrics"),
        library_versions=report.get("versions") or {"adapterdeck": meta.get("adapterdeck_version", "")},
        report=report or None,
        parent=_parent_ref(meta),
    )


def _parent_ref(meta: dict[str, Any]) -> str | None:
    """The version an adapter was continued from, when that is a registry version (a run continued
    from a directory has no lineage the registry can name)."""
    ref = (meta.get("parent") or {}).get("ref")
    try:
        parsed = parse_ref(ref) if isinstance(ref, str) else None
    except InvalidRef:
        return None
    return str(ref) if parsed is not None and parsed.version is not None else None
