"""The training loss on answer tokens only, computing the vocabulary projection only where it counts.

A causal LM's output layer maps every position's hidden state to the whole vocabulary: on
SmolLM2-135M that is 28M of its 135M parameters and a 49,152-wide softmax per token. Training
on chat data scores only the assistant's tokens, often a small share of each example (one word
out of sixty in a sentiment task), so the logits of the other positions are computed and thrown
away. ``answer_loss`` asks the model for the logits of the positions that predict a label
(transformers' ``logits_to_keep`` with an index tensor) and takes the same token-mean cross
entropy the model's own loss does: the same number, less work.

The mean token accuracy (the share of label tokens whose logits' argmax is the label, TRL's
``mean_token_accuracy``) is counted from the logits the loss was computed from, in the same
pass: ``TokenAccuracy``; ``sft_trainer`` logs it with the training loss and with each validation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from adapterdeck.core.encode import IGNORE

if TYPE_CHECKING:
    import torch


class TokenAccuracy:
    """The label tokens counted since the last ``take`` and how many of them the model predicted
    (the argmax of its logits at the position before is the label).

    The counts stay tensors on the model's device until ``take``: counting a batch does not wait
    for the device.
    """

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None  # (predicted, label tokens)

    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Count a batch: ``logits`` (..., vocabulary) at the positions that predict ``target``
        (the next tokens; ``IGNORE`` where there is no label)."""
        import torch

        labelled = target != IGNORE
        predicted = (logits.detach().argmax(dim=-1) == target) & labelled
        counts = torch.stack([predicted.sum(), labelled.sum()])
        self._counts = counts if self._counts is None else self._counts + counts

    def add_shifted(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count a batch from a causal LM's logits at every position and the batch's ``labels``.

        Prompt learning puts virtual tokens in front of the input, so the model answers more
        positions than ``labels`` has: the last ``labels.shape[1]`` are the input's.
        """
        logits = logits[:, -labels.shape[1] :]
        self.add(logits[:, :-1], labels[:, 1:].to(logits.device))

    def take(self, gather: Callable[[torch.Tensor | None], torch.Tensor] | None = None) -> float | None:
        """The share predicted of what was counted (None: no label token), and start again.

        ``gather`` collects every process's counts under data parallelism: each process's
        ``(predicted, label tokens)`` (None where it counted nothing), concatenated.
        """
        counts, self._counts = self._counts, None
        if gather is not None:
            counts = gather(counts).view(-1, 2).sum(dim=0)
        if counts is None:
            return None
        predicted, tokens = (int(n) for n in counts.tolist())
        return predicted / tokens if tokens else None


def answer_loss(
    model: Any,
    inputs: dict[str, Any],
    num_items_in_batch: int | torch.Tensor | None = None,
    accuracy: TokenAccuracy | None = None,
) -> tuple[torch.Tensor, Any]:
    """Mean cross entropy over the label tokens in ``inputs`` (a batch with ``labels``), and the outputs.

    With ``num_items_in_batch`` (the Trainer's count of label tokens over all accumulated batches),
    the sum is divided by it, as transformers' causal-LM loss does, so gradient accumulation adds
    up to the loss of the whole batch. ``accuracy`` counts the batch's label tokens and how many
    the logits predict, from the same answer-only logits.
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
    if accuracy is not None:
        accuracy.add(logits, picked)
    return total / count, outputs


#: The keys the mean token accuracy is logged under, as TRL's trainers log it.
TRAIN_ACCURACY, EVAL_ACCURACY = "mean_token_accuracy", "eval_mean_token_accuracy"
#: Which accuracy goes with which log: the training loss's, and each validation's.
_LOGGED = (("train", "loss", TRAIN_ACCURACY), ("eval", "eval_loss", EVAL_ACCURACY))


def sft_trainer(answer_only: bool) -> type:
    """A transformers ``Trainer`` for supervised fine-tuning that logs the mean token accuracy.

    With ``answer_only`` its loss is ``answer_loss`` (logits only where a label is; see
    ``answer_only_logits``), otherwise the model's own. Either way the accuracy is counted from
    the logits the loss was computed from, and logged as TRL's ``SFTTrainer`` logs it: with each
    training loss (``mean_token_accuracy``, over the batches since the loss was last logged) and
    with each validation (``eval_mean_token_accuracy``, over the whole validation set). It is
    weighted by tokens: the share of every label token counted, where TRL averages each batch's
    share.
    """
    from transformers import Trainer

    class SftTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._accuracy = {"train": TokenAccuracy(), "eval": TokenAccuracy()}

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            accuracy = self._accuracy["train" if model.training else "eval"]
            if answer_only:
                loss, outputs = answer_loss(model, inputs, num_items_in_batch, accuracy)
                # Normalized over the whole accumulated batch, as the model's own loss is with
                # num_items_in_batch: the Trainer must not divide it again.
                self.loss_is_scaled_for_ga = num_items_in_batch is not None
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    # Data-parallel: num_items_in_batch counts every process's tokens and DDP
                    # averages the gradients, so each process's share is scaled back up, as the
                    # Trainer's own compute_loss does.
                    loss = loss * self.accelerator.num_processes
            else:
                loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
                accuracy.add_shifted(outputs.logits, inputs["labels"])
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # Every process makes both calls, so the counts can be gathered there.
            gather = self._gather if self.accelerator.num_processes > 1 else None
            for mode, loss_key, key in _LOGGED:
                if loss_key in logs:
                    value = self._accuracy[mode].take(gather)
                    if value is not None:
                        logs[key] = value
            super().log(logs, start_time)

        def _gather(self, counts: torch.Tensor | None) -> torch.Tensor:
            import torch

            device = self.accelerator.device
            local = torch.zeros(2, dtype=torch.long, device=device) if counts is None else counts.to(device)
            return self.accelerator.gather(local)

    return SftTrainer


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
