"""The answer-only loss equals the model's own causal-LM loss, padded or packed, and its gradients too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening

from adapterdeck.core.basemodel import load_tokenizer
from adapterdeck.core.encode import encode
from adapterdeck.core.formats import Conversation, Message
from adapterdeck.core.loss import answer_loss, answer_only_logits


def _conversations() -> list[Conversation]:
    pairs = [("hello there", "hi"), ("what is two plus two", "four, as always"), ("name a color", "blue")]
    return [
        Conversation(messages=(Message("user", q), Message("assistant", a)), line=i + 1)
        for i, (q, a) in enumerate(pairs)
    ]


@pytest.fixture(scope="module")
def lora(base_model: Path) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return base, model, load_tokenizer(base_model)


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_same_loss_and_gradients_as_the_models_own(lora: tuple, packed: bool) -> None:
    _, model, tokenizer = lora
    rows = [encode(tokenizer, c) for c in _conversations()]
    collator = (
        DataCollatorWithFlattening(return_position_ids=True)
        if packed
        else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    )
    batch = collator(rows)
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    assert n_labels > 0

    model.zero_grad()
    reference = model(**batch).loss
    reference.backward()
    expected = _grads(model)

    model.zero_grad()
    loss, outputs = answer_loss(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert outputs.logits.shape[1] < batch["input_ids"].shape[1]  # fewer positions projected
    for got, want in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    # With the Trainer's count of label tokens, the sum is divided by it (gradient accumulation).
    summed, _ = answer_loss(model, batch, num_items_in_batch=2 * n_labels)
    assert summed.item() == pytest.approx(reference.item() / 2, rel=1e-5)


def test_prompt_tuning_keeps_the_full_projection(base_model: Path) -> None:
    """Virtual tokens in front of the input move the label positions: those adapters opt out."""
    base = AutoModelForCausalLM.from_pretrained(base_model)
    prompt = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not answer_only_logits(base, prompt)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    prefix = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert answer_only_logits(base, prefix)


def test_evaluation_losses_are_the_same_with_the_projection_cut(
    lora: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterdeck.core import evaluate

    _, model, tokenizer = lora
    model.eval()
    cut = evaluate.example_losses(model, tokenizer, _conversations(), batch_size=2)
    monkeypatch.setattr(evaluate, "answer_only_logits", lambda base, model: False)
    full = evaluate.example_losses(model, tokenizer, _conversations(), batch_size=2)
    assert cut == pytest.approx(full, rel=1e-5)
