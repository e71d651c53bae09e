"""The base's evaluation outputs, cached on disk: read back only where all that decides them matches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from adapterdeck.core.evalcache import BaseOutputCache, open_cache, weights_digest
from adapterdeck.core.evaluate import BASE, FEW_SHOT, Comparison, compare
from adapterdeck.core.plugins import catalog


@pytest.fixture
def setup(fresh_plugins: None, base_model: Path, tmp_path: Path) -> tuple:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterdeck.core.basemodel import load_tokenizer
    from adapterdeck.core.dataset import load_examples
    from adapterdeck.core.demo import write_demo_dataset

    tokenizer = load_tokenizer(str(base_model))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    examples = load_examples(write_demo_dataset(tmp_path / "d.jsonl", task="sentiment", n=10)).examples
    return model, tokenizer, examples


def _compare(model: Any, tokenizer: Any, examples: list, cache: BaseOutputCache | None) -> Comparison:
    evaluators = [catalog().evaluator(n) for n in ("loss", "exact_match", "general")]
    return compare(
        model,
        tokenizer,
        examples[3:],
        evaluators,
        base_context=model.disable_adapter,
        shots=examples[:3],
        max_new_tokens=8,
        samples=2,
        base_cache=cache,
    )


def test_a_second_run_reads_the_base_back_and_scores_the_same(
    setup: tuple, base_model: Path, tmp_path: Path
) -> None:
    model, tokenizer, examples = setup
    cache = open_cache(str(base_model), model, "lora, as trained", root=tmp_path / "cache")
    assert cache is not None
    first = _compare(model, tokenizer, examples, cache)
    assert first.cached == []
    stored = sorted((tmp_path / "cache").glob("*.json"))
    assert len(stored) == 3  # zero-shot and few-shot on the task, zero-shot on the probes

    again = _compare(model, tokenizer, examples, cache)
    assert again.cached == [BASE, FEW_SHOT, f"{BASE} general"]
    assert again.metrics == first.metrics  # the tuned model ran again; the base was read back
    assert again.samples == first.samples
    uncached = _compare(model, tokenizer, examples, None)
    assert uncached.metrics == first.metrics and uncached.cached == []

    # A cache file that does not read back whole is generated again, not trusted.
    stored[0].write_text("{not json")
    third = _compare(model, tokenizer, examples, cache)
    assert len(third.cached) == 2 and third.metrics == first.metrics
    assert json.loads(stored[0].read_text())["predictions"]


def test_the_key_covers_weights_loading_and_settings(setup: tuple, base_model: Path, tmp_path: Path) -> None:
    model, _, examples = setup
    trained = open_cache(str(base_model), model, "lora, as trained", root=tmp_path)
    evaluated = open_cache(str(base_model), model, "lora, for evaluation", root=tmp_path)
    assert trained is not None and evaluated is not None
    key = trained.key(examples, new_tokens=8, batch_size=16)
    assert key == trained.key(examples, new_tokens=8, batch_size=16)
    assert key != trained.key(examples, new_tokens=8, losses=True, batch_size=16)
    assert key != evaluated.key(examples, new_tokens=8, batch_size=16)  # prepared another way
    assert key != trained.key(examples[1:], new_tokens=8, batch_size=16)  # other prompts
    assert key != trained.key(examples, new_tokens=9, batch_size=16)
    assert key != trained.key(examples, new_tokens=8, batch_size=8)  # other padding, other numerics

    copy = tmp_path / "copy"
    shutil.copytree(base_model, copy)
    assert weights_digest(str(copy)) == weights_digest(str(base_model))
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = open_cache(str(copy), model, "lora, as trained", root=tmp_path)
    assert changed is not None and changed.key(examples, new_tokens=8, batch_size=16) != key
    # A hub id is not a directory whose files can be hashed here: not cached.
    assert open_cache("HuggingFaceTB/SmolLM2-135M-Instruct", model, "lora", root=tmp_path) is None
