"""The training loss on answer tokens only, computing the vocabulary projection only where it counts.

A causal LM's output layer maps every position's hidden state to the whole vocabulary: on
SmolLM2-135M that is 28M of its 135M parameters and a 49,152-wide softmax per token. Training
on chat data scores only the assistant's tokens, often a small share of each example (one word
out of sixty in a sentiment task), so the logits of the other positions are computed and thrown
away. ``answer_loss`` asks the model for the logits of the positions that predict a label
(transformers' ``logits_to_keep`` with an index tensor) and takes the same token-mean cross
entropy the model's own loss does: the same number, less work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterdeck.core.encode import IGNORE

if TYPE_CHECKING:
    import torch


def answer_loss(
    model: Any,
    inputs: dict[str, Any],
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Any]:
    """Mean cross entropy over the label tokens in ``inputs`` (a batch with ``labels``), and the outputs.

    With ``num_items_in_batch`` (the Trainer's count of label tokens over all accumulated batches),
    the sum is divided by it, as transformers' causal-LM loss does, so gradient accumulation adds
    up to the loss of the whole batch.
    """
    import torch

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    target = labels[:, 1:]
    # Position i predicts token i + 1: keep the positions whose next token is a label in any row.
    keep = (target != IGNORE).any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:  # nothing to learn in this batch: a zero that still has a graph
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    outputs = model(**inputs, logits_to_keep=keep)
    logits = outputs.logits.float()
    picked = target[:, keep]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), picked.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    if num_items_in_batch is None:
        count = (picked != IGNORE).sum().clamp(min=1)
    else:
        count = num_items_in_batch
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count, outputs


def answer_loss_trainer() -> type:
    """A transformers ``Trainer`` whose ``compute_loss`` is ``answer_loss``."""
    from transformers import Trainer

    class AnswerLossTrainer(Trainer):
        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = answer_loss(model, inputs, num_items_in_batch)
            # Normalized over the whole accumulated batch, as the model's own loss is with
            # num_items_in_batch: the Trainer must not divide it again.
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            return (loss, outputs) if return_outputs else loss

    return AnswerLossTrainer


def answer_only_logits(base: Any, model: Any) -> bool:
    """Whether ``answer_loss`` is exact for ``model`` (a PEFT model over ``base``).

    The base's forward must take ``logits_to_keep``, and the adapter must not put virtual tokens
    in front of the input (prompt and p-tuning do; prefix tuning adds keys and values instead),
    which would move the positions the labels point at.
    """
    supports = getattr(base, "_supports_logits_to_keep", None)
    if supports is None or not supports():
        return False
    configs = getattr(model, "peft_config", {}).values()
    return all(not c.is_prompt_learning or c.peft_type == "PREFIX_TUNING" for c in configs)
