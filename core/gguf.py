"""Turn a GGUF model file into a standard Hugging Face model directory, offline.

transformers reads GGUF (with the ``gguf`` package), dequantizing the weights into torch tensors,
but refuses to save such a model. We load the weights that way, drop the quantization note from
the config, and save a plain safetensors checkpoint with its tokenizer, chat template and
generation config, which transformers, PEFT and vLLM load like any other model directory.

Nothing is written unless the whole conversion succeeds: the directory is built beside ``out``
and renamed into place. Same file, same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapterdeck.core.errors import AdapterdeckError

GGUF_MAGIC = b"GGUF"
BASE_INFO = "adapterdeck-base.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise AdapterdeckError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    return gguf


def inspect_gguf(path: Path) -> dict[str, Any]:
    """The architecture and metadata of a GGUF model file, or an error that says what is wrong with it."""
    if not path.is_file():
        raise AdapterdeckError(f"{path}: no such file")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise AdapterdeckError(f"{path}: not a GGUF file (it starts with {head!r}, a GGUF file with b'GGUF')")
    gguf = _require_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # numpy and struct errors alike mean a damaged file
        raise AdapterdeckError(
            f"{path}: cannot read this GGUF file, it is truncated or damaged ({exc})"
        ) from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise AdapterdeckError(
                f"{path}: truncated: tensor {tensor.name} ends at byte {end:,}, the file has {size:,}"
            )

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    kind = field("general.type")
    if kind not in (None, "model"):
        raise AdapterdeckError(f"{path}: this GGUF file holds a {kind!r}, not a model")
    architecture = field("general.architecture")
    if not architecture:
        raise AdapterdeckError(f"{path}: the file does not say its architecture (general.architecture)")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise AdapterdeckError(
            f"{path}: architecture {architecture!r} is not supported; "
            f"supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
        )
    if not reader.tensors:
        raise AdapterdeckError(f"{path}: the file holds no tensors")
    return {
        "architecture": architecture,
        "name": field("general.name"),
        "tensors": len(reader.tensors),
        "has_chat_template": field("tokenizer.chat_template") is not None,
    }


def convert_gguf(
    path: str | Path,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    source: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the model in the GGUF file ``path`` to ``out`` as a Hugging Face model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    say = progress or (lambda _msg: None)
    path, out = Path(path), Path(out)
    if out.exists() and any(out.iterdir()):
        raise AdapterdeckError(f"{out} is not empty; choose another directory or remove it")
    say(f"checking {path.name}")
    info = inspect_gguf(path)
    say(f"hashing {path.name}")
    digest = file_sha256(path)
    hf_logging.disable_progress_bar()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        say("reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        say("dequantizing the weights")
        with _quiet_tqdm():
            loaded = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
        config = loaded.config
        # The config remembers the GGUF origin, and transformers then refuses to save the model.
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.name_or_path = ""
        torch_dtype = getattr(torch, dtype)
        config.dtype = torch_dtype
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad
        )
        say("writing safetensors, tokenizer and configs")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.name_or_path = ""
        tokenizer.model_max_length = getattr(config, "max_position_embeddings", None) or 2048
        tokenizer.save_pretrained(tmp)
        (tmp / BASE_INFO).write_text(
            json.dumps(
                {
                    "builder": "adapterdeck base from-gguf",
                    "source": {"file": path.name, "sha256": digest, **(source or {})},
                    "architecture": info["architecture"],
                    "name": info["name"],
                    "dtype": dtype,
                },
                indent=2,
            )
            + "\n"
        )
        _load_check(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except AdapterdeckError:
        raise
    except Exception as exc:
        raise AdapterdeckError(f"{path}: could not convert the model: {type(exc).__name__}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {out}")
    return out


@contextmanager
def _quiet_tqdm() -> Iterator[None]:
    # transformers draws its own tqdm bar while dequantizing; the caller shows progress instead.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = lambda iterable, **_kw: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_check(model_dir: Path) -> None:
    """The written directory loads as a plain model (no GGUF left in its config)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None):
        raise AdapterdeckError(f"{model_dir}: the converted config still names a quantization")
