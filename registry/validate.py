"""Everything checked before an adapter version becomes visible. A refusal lists every reason.

Checks: the directory holds a PEFT config PEFT can read and safetensors weights whose header
parses, whose data is complete and whose tensors agree with the config; the adapter was made
for a base the registry knows (by fingerprint of its config, vocabulary and chat template) and
its tensors fit that base's layers; a LoRA meant for vLLM follows vLLM's rules (rank within the
maximum, no DoRA, no bias, no modules_to_save, only linear layers the base has); size limits.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from adapterdeck.core.adapters import ADAPTER_META, PEFT_CONFIG
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.methods import ENGINE_PEFT, ENGINE_VLLM

WEIGHTS = "adapter_model.safetensors"
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
PEFT_PREFIX = "base_model.model."


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


def locate(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """The adapter directory (``adapter/`` inside a run) and the run's report, if any."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterdeckError(f"{path} is not a directory")
    report = None
    if (path / "adapter").is_dir():
        if (path / "report.json").exists():
            report = json.loads((path / "report.json").read_text())
        path = path / "adapter"
    return path, report


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The tensors of a safetensors file, and what is wrong with the file (empty when sound)."""
    size = path.stat().st_size
    if size < 8:
        return {}, [f"{path.name} is {size} bytes: too short to be safetensors"]
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > min(size - 8, 100 * 1024**2):
            return {}, [
                f"{path.name}: header length {length} does not fit the file ({size} bytes); truncated?"
            ]
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            return {}, [f"{path.name}: the header is not valid JSON ({exc})"]
    if not isinstance(header, dict):
        return {}, [f"{path.name}: the header is not a JSON object"]
    header.pop("__metadata__", None)
    problems: list[str] = []
    data_bytes = size - 8 - length
    end = 0
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path.name}: tensor {name} has a malformed header entry")
            continue
        if dtype not in DTYPE_BYTES:
            problems.append(f"{path.name}: tensor {name} has unknown dtype {dtype}")
            continue
        if stop - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            problems.append(
                f"{path.name}: tensor {name} {dtype}{shape} does not fill its {stop - start} bytes"
            )
        end = max(end, stop)
    if end > data_bytes:
        problems.append(
            f"{path.name} is truncated: its header needs {end} bytes of data, the file has {data_bytes}"
        )
    return header, problems


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


def _lora_problems(
    config: dict[str, Any], tensors: dict[str, Any], base: BaseRecord, max_rank: int
) -> list[str]:
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
                problems.append(f"tensor {key} is not a LoRA A/B matrix")
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
            problems.append(f"{key} has shape {shape}; the base's {module} needs {expected}")
        elif rank not in ranks:
            problems.append(f"{key} has rank {rank}, but adapter_config.json says r={r}")
    for module in seen_missing:
        problems.append(f"targets {module}, which is not a linear layer of the base")
    if not any(".lora_A." in k for k in tensors):
        problems.append("has no LoRA weights")
    return problems


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
    directory, report = locate(path)
    reasons: list[str] = []
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    listed = [(p.name, p, p.stat().st_size) for p in files]
    size = sum(s for _, _, s in listed)
    if size > max_bytes:
        reasons.append(f"the adapter is {size:,} bytes; the limit is {max_bytes:,}")

    config: dict[str, Any] = {}
    config_file = directory / PEFT_CONFIG
    if not config_file.exists():
        reasons.append(f"no {PEFT_CONFIG}")
    else:
        try:
            from peft import PeftConfig

            PeftConfig.from_pretrained(str(directory))
            config = json.loads(config_file.read_text())
        except Exception as exc:
            reasons.append(f"{PEFT_CONFIG} is not a config PEFT can read: {exc}")
    meta: dict[str, Any] = {}
    if (directory / ADAPTER_META).exists():
        try:
            meta = json.loads((directory / ADAPTER_META).read_text())
        except ValueError as exc:
            reasons.append(f"{ADAPTER_META} is not valid JSON: {exc}")

    tensors: dict[str, Any] = {}
    if (directory / WEIGHTS).exists():
        tensors, problems = read_safetensors_header(directory / WEIGHTS)
        reasons.extend(problems)
    elif (directory / "adapter_model.bin").exists():
        reasons.append("the weights are a pickle (adapter_model.bin); save them as adapter_model.safetensors")
    else:
        reasons.append(f"no {WEIGHTS}")

    base_record: BaseRecord | None = None
    wanted = base or meta.get("base") or config.get("base_model_name_or_path")
    fingerprint = None if base else meta.get("base_fingerprint")
    if not wanted and not fingerprint:
        reasons.append("names no base model (adapter_config.json base_model_name_or_path); pass --base")
    else:
        try:
            fresh = None
            if fingerprint is None:
                fresh = base_record_for(wanted)
                fingerprint = fresh.fingerprint
            base_record = find_base(fingerprint)
            if base_record is None:
                registered = known_bases()
                # A concurrent publish may have recorded this very base since find_base looked.
                same = [b for b in registered if b.fingerprint == fingerprint]
                if same:
                    base_record = same[0]
                elif registered:
                    names = ", ".join(f"{b.name} ({b.fingerprint[:19]})" for b in registered)
                    reasons.append(
                        f"was trained on another base ({wanted}, {fingerprint[:19]}); "
                        f"this registry serves {names}"
                    )
                else:
                    # The first adapter of an empty registry defines its base.
                    base_record = fresh or base_record_for(wanted)
                    if base_record.fingerprint != fingerprint:
                        reasons.append(f"the base {wanted} has changed since the adapter was trained on it")
        except AdapterdeckError as exc:
            reasons.append(f"cannot check the base model: {exc}")

    peft_type = str(config.get("peft_type", ""))
    served_by = list(meta.get("served_by") or [])
    if config and peft_type == "LORA" and base_record is not None and tensors:
        lora = _lora_problems(config, tensors, base_record, max_rank)
        if not served_by:  # a plain PEFT adapter: vLLM serves it if it follows vLLM's rules
            served_by = [ENGINE_PEFT] if lora else [ENGINE_VLLM, ENGINE_PEFT]
        elif ENGINE_VLLM in served_by:
            reasons.extend(lora)
    elif ENGINE_VLLM in served_by and peft_type and peft_type != "LORA":
        reasons.append(f"claims vLLM can serve it, but vLLM serves only LoRA adapters, not {peft_type}")
    served_by = served_by or [ENGINE_PEFT]

    if reasons or base_record is None:
        raise PublishRefused(str(path), reasons or ["no base model could be determined"])
    report = report or {}
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
        base=base_record,
        size_bytes=size,
        dataset_sha256=data.get("sha256") or meta.get("data_sha256"),
        data_format=data.get("format") or meta.get("format"),
        metrics=test.get("metrics"),
        library_versions=report.get("versions") or {"adapterdeck": meta.get("adapterdeck_version", "")},
    )
