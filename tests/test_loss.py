"""The answer-only loss equals the model's own causal-LM loss, padded or packed, and its gradients too;
the mean token accuracy counted from its logits is the share of answer tokens predicted, by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening

from adapterdeck.core.basemodel import load_tokenizer
from adapterdeck.core.encode import encode
from adapterdeck.core.formats import Conversation, Message
from adapterdeck.core.loss import TokenAccuracy, answer_loss, answer_only_logits


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


def _accuracy_by_hand(model: torch.nn.Module, rows: list[dict[str, list[int]]]) -> tuple[int, int]:
    """Each example alone, position by position: is the argmax of the logits at i the label at i + 1?"""
    predicted = tokens = 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            logits = logits[-len(row["input_ids"]) :]  # past any virtual tokens in front
            for i, label in enumerate(row["labels"][1:]):
                if label != -100:
                    tokens += 1
                    predicted += int(int(logits[i].argmax()) == label)
    return predicted, tokens


def test_token_accuracy_counts_the_label_tokens_the_argmax_predicts() -> None:
    accuracy = TokenAccuracy()
    assert accuracy.take() is None  # nothing counted
    # Two rows, vocabulary of 4; the logits at position i predict the token at i + 1.
    labels = torch.tensor([[-100, 2, 3, -100], [-100, -100, 1, 0]])
    logits = torch.full((2, 4, 4), -1.0)
    for row, position, token in [(0, 0, 2), (0, 1, 0), (1, 1, 1), (1, 2, 0), (1, 3, 3), (0, 2, 1)]:
        logits[row, position, token] = 1.0
    # Labelled next tokens: (0,1)=2 predicted at 0: yes; (0,2)=3 predicted at 1 as 0: no;
    # (1,2)=1 at 1: yes; (1,3)=0 at 2: yes. The last positions predict nothing.
    accuracy.add_shifted(logits, labels)
    assert accuracy.take() == pytest.approx(3 / 4)
    assert accuracy.take() is None  # taking it starts again

    # Counts add up over batches until taken: tokens weigh the same in any batch.
    accuracy.add_shifted(logits, labels)
    accuracy.add(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), torch.tensor([[0, -100]]))  # 0 of 1
    assert accuracy.take() == pytest.approx(3 / 5)
    # Virtual tokens in front (prompt tuning): the input's positions are the last ones.
    accuracy.add_shifted(torch.cat([torch.zeros(2, 3, 4), logits], dim=1), labels)
    assert accuracy.take() == pytest.approx(3 / 4)
    # Gathered across processes: every process's counts add up, one that counted nothing too.
    accuracy.add_shifted(logits, labels)
    assert accuracy.take(lambda counts: torch.cat([counts, torch.tensor([1, 4])])) == pytest.approx(4 / 8)
    assert accuracy.take(lambda counts: torch.tensor([1, 4, 0, 0] if counts is None else [])) == 1 / 4


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_answer_loss_counts_the_accuracy_of_its_own_logits(lora: tuple, packed: bool) -> None:
    _, model, tokenizer = lora
    rows = [encode(tokenizer, c) for c in _conversations()]
    collator = (
        DataCollatorWithFlattening(return_position_ids=True)
        if packed
        else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    )
    # The untrained model predicts none of the answers: relabel every other answer token as what it
    # predicts there, so that the share to find is neither 0 nor 1.
    with torch.no_grad():
        for row in rows:
            predictions = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].argmax(-1).tolist()
            answer = [i for i, label in enumerate(row["labels"]) if i and label != -100]
            for i in answer[::2]:
                row["labels"][i] = predictions[i - 1]
    predicted, tokens = _accuracy_by_hand(model, rows)
    assert tokens == sum(1 for r in rows for label in r["labels"][1:] if label != -100)
    assert 0 < predicted < tokens

    # Packed rows attend only to themselves without a KV cache, as training runs.
    batch = {**collator(rows), "use_cache": False}
    answer_only = TokenAccuracy()
    with torch.no_grad():
        answer_loss(model, batch, accuracy=answer_only)
        full = TokenAccuracy()  # the plain Trainer's path: from the model's logits at every position
        full.add_shifted(model(**batch).logits, batch["labels"])
    assert answer_only.take() == pytest.approx(predicted / tokens)
    assert full.take() == pytest.approx(predicted / tokens)


def test_accuracy_past_prompt_tuning_s_virtual_tokens(base_model: Path) -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    tokenizer = load_tokenizer(base_model)
    rows = [encode(tokenizer, c) for c in _conversations()]
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(rows)
    accuracy = TokenAccuracy()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[1] == batch["labels"].shape[1] + 4
    accuracy.add_shifted(logits, batch["labels"])
    predicted, tokens = _accuracy_by_hand(model, rows)
    assert accuracy.take() == pytest.approx(predicted / tokens)
