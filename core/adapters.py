"""Adapter directories: read what they are, load them onto their base, merge them into it."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterdeck.core.basemodel import load_tokenizer
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.methods import ENGINE_PEFT, TuningMethod
from adapterdeck.core.plugins import catalog

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_META = "adapterdeck.json"
PEFT_CONFIG = "adapter_config.json"


@dataclass
class AdapterInfo:
    path: Path
    peft_type: str
    base: str
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    served_by: list[str] = field(default_factory=lambda: [ENGINE_PEFT])
    meta: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def method_plugin(self) -> TuningMethod | None:
        """The method plugin that made the adapter, when it is installed."""
        plugins = catalog()
        return plugins.method(self.method) if self.method in plugins.methods else None


def read_adapter(path: str | Path) -> AdapterInfo:
    """Describe an adapter directory, or a run directory holding ``adapter/``."""
    path = Path(path)
    if (path / "adapter" / PEFT_CONFIG).exists():
        path = path / "adapter"
    config_file = path / PEFT_CONFIG
    if not config_file.exists():
        raise AdapterdeckError(f"{path} is not an adapter directory (no {PEFT_CONFIG}) nor a run directory")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise AdapterdeckError(f"{config_file}: not valid JSON: {exc}") from None
    meta: dict[str, Any] = {}
    if (path / ADAPTER_META).exists():
        meta = json.loads((path / ADAPTER_META).read_text())
    base = meta.get("base") or config.get("base_model_name_or_path")
    if not base:
        raise AdapterdeckError(f"{config_file} names no base model; pass --base")
    return AdapterInfo(
        path=path,
        peft_type=str(config.get("peft_type", "")),
        base=base,
        method=meta.get("method"),
        params=meta.get("params", {}),
        served_by=meta.get("served_by", [ENGINE_PEFT]),
        meta=meta,
        config=config,
    )


def _load_base(info: AdapterInfo, base: str, for_merge: bool) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    method = info.method_plugin()
    if method is None:
        return AutoModelForCausalLM.from_pretrained(base)
    params = method.params.model_validate(info.params)
    return method.load_base_for_merge(base, params) if for_merge else method.load_base(base, params)


def load_adapter(
    info: AdapterInfo, base: str | None = None, *, for_merge: bool = False
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base (loaded the way the adapter's method loads it) with the adapter on top, and its tokenizer."""
    from peft import PeftModel

    base = base or info.base
    model = _load_base(info, base, for_merge)
    try:
        peft_model = PeftModel.from_pretrained(model, str(info.path))
    except Exception as exc:
        raise AdapterdeckError(f"cannot load the adapter {info.path} onto {base!r}: {exc}") from exc
    peft_model.eval()
    return peft_model, load_tokenizer(base)


def merge(info: AdapterInfo, out: str | Path, base: str | None = None) -> Path:
    """Write a standalone model: the adapter merged into (a full-precision copy of) its base."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AdapterdeckError(f"{out} is not empty")
    peft_model, tokenizer = load_adapter(info, base, for_merge=True)
    if not hasattr(peft_model.base_model, "merge_and_unload"):
        raise AdapterdeckError(
            f"{info.peft_type} adapters cannot be merged into the base; serve them as adapters instead"
        )
    merged = peft_model.merge_and_unload()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "adapterdeck-merged.json").write_text(
        json.dumps({"base": base or info.base, "adapter": str(info.path), "method": info.method}, indent=2)
        + "\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
