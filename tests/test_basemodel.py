"""The offline demo base model: deterministic, loads in transformers, served by real vLLM."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from adapterdeck.core.basemodel import load_tokenizer, render_chat, weights_digest
from adapterdeck.core.errors import AdapterdeckError

from .conftest import run_cli


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, base_model: Path) -> None:
    for name, seed in (("again", "0"), ("other", "1")):
        result = run_cli("base", "build", "--out", str(tmp_path / name), "--seed", seed)
        assert result.returncode == 0, result.stderr
    again, other = tmp_path / "again", tmp_path / "other"
    for f in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (again / f).read_bytes() == (base_model / f).read_bytes(), f
    assert weights_digest(other) != weights_digest(base_model)
    assert (other / "tokenizer.json").read_bytes() == (base_model / "tokenizer.json").read_bytes()


def test_loads_in_transformers_and_generates(base_model: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model)
    assert config.model_type == "llama"
    assert config.hidden_size // config.num_attention_heads == 64  # vLLM's CPU attention needs it
    tokenizer = load_tokenizer(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(base_model)
    prompt = render_chat(
        tokenizer, [{"role": "user", "content": "Where is the invoice?"}], add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    prompt_ids = inputs["input_ids"][0].tolist()
    assert out[0, : len(prompt_ids)].tolist() == prompt_ids  # the answer continues the prompt
    new = out[0, len(prompt_ids) :]
    answer = tokenizer.decode(new)
    assert answer
    # The generated ids decode to text that continues the prompt's exactly, byte for byte.
    assert tokenizer.decode(out[0]) == prompt + answer
    # Byte-level BPE: any text round-trips.
    text = 'Grüße {"amount": 42.5} — ok'
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_a_hub_id_is_accepted_and_fails_clearly_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdapterdeckError, match="looked up as a hub id"):
        load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")


@pytest.mark.vllm
def test_vllm_serves_the_base(vllm_server: str, base_model: Path) -> None:
    models = httpx.get(f"{vllm_server}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [str(base_model)]
    reply = httpx.post(
        f"{vllm_server}/v1/chat/completions",
        json={
            "model": str(base_model),
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["completion_tokens"] > 0
    assert isinstance(body["choices"][0]["message"]["content"], str)
