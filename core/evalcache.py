"""The base model's evaluation outputs, kept on disk: a base answers the same prompts the same way.

Every run on a base scores the base beside the tuned model: on the ``general`` probes (100
prompts, up to 64 new tokens each) and on the task's test split, zero-shot and few-shot. Those
outputs depend only on the base's weights, how it is loaded, the prompts and the generation
settings, not on the adapter, so a second run on the same base (the other demo task, the next
run of a sweep, ``adapterdeck eval`` after ``train``) reads them back instead of generating them
again; lm-evaluation-harness caches model responses for the same reason.

The key is a digest of everything that decides the outputs: each weight file's sha256, the
dtype and quantization the model was loaded with, the prompts and references, the generation
budget and batch size (left padding changes the numerics a little), and the versions of torch,
transformers and adapterdeck. Anything else that differs makes another key; a cached entry is
never updated in place (written to a temporary file, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterdeck.core import __version__
from adapterdeck.core.formats import Conversation

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from adapterdeck.core.evaluate import ModelOutputs

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/adapterdeck/base-outputs`` (``~/.cache/...`` when it is not set)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "adapterdeck" / "base-outputs"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(base: str) -> str | None:
    """A digest of every file of a local model directory; None for a hub id (not cached)."""
    root = Path(base)
    if not root.is_dir():
        return None
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    listing = [(p.name, _file_sha256(p)) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def base_identity(base: str, model: PreTrainedModel, loaded: str) -> dict[str, Any] | None:
    """What decides a loaded base's outputs besides the prompts; None when it cannot be pinned down.

    ``loaded`` says how the model was loaded and prepared (a method's training preparation can
    change a base's numerics: QLoRA's upcasts its norms), so differently prepared bases never
    share an entry.
    """
    weights = weights_digest(base)
    if weights is None:
        return None
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None and hasattr(quantization, "to_dict"):
        quantization = quantization.to_dict()
    return {
        "weights": weights,
        "loaded": loaded,
        "dtype": str(next(model.parameters()).dtype),
        "quantization": json.loads(json.dumps(quantization, default=str)),
        "torch": metadata.version("torch"),
        "transformers": metadata.version("transformers"),
        "adapterdeck": __version__,
    }


def prompts_digest(examples: Sequence[Conversation]) -> str:
    payload = [[c.as_dicts(), c.reference] + ([r.reference] if (r := c.rejected) else []) for c in examples]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class BaseOutputCache:
    """Base model outputs under ``root``, one JSON file per key, for one base (``identity``)."""

    root: Path
    identity: dict[str, Any]

    def key(self, examples: Sequence[Conversation], **settings: Any) -> str:
        payload = {"base": self.identity, "prompts": prompts_digest(examples), **settings}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def get(self, key: str, n: int) -> ModelOutputs | None:
        """The outputs stored under ``key``, if there are ``n`` of them and they read back whole."""
        from adapterdeck.core.evaluate import ModelOutputs

        try:
            data = json.loads((self.root / f"{key}.json").read_text(encoding="utf-8"))
            outputs = ModelOutputs(
                list(data["losses"]), list(data["predictions"]), list(data.get("margins") or [None] * n)
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not len(outputs.losses) == len(outputs.predictions) == len(outputs.margins) == n:
            return None
        return outputs

    def put(self, key: str, outputs: ModelOutputs) -> None:
        """Store ``outputs`` under ``key``; a cache that cannot be written is skipped, not an error."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(
                json.dumps(
                    {"losses": outputs.losses, "predictions": outputs.predictions, "margins": outputs.margins}
                ),
                encoding="utf-8",
            )
            os.replace(tmp, self.root / f"{key}.json")
        except OSError:
            pass


def open_cache(
    base: str, model: PreTrainedModel, loaded: str, root: Path | None = None
) -> BaseOutputCache | None:
    """The cache for ``model`` loaded from ``base`` (``loaded``: how), or None when it cannot be keyed."""
    identity = base_identity(base, model, loaded)
    if identity is None:
        return None
    return BaseOutputCache(root or default_cache_dir(), identity)
