"""The built-in training objectives: ``sft`` (supervised) and ``dpo`` (TRL's DPOTrainer)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from adapterdeck.core import hookimpl
from adapterdeck.core.formats import PREFERENCES, Conversation
from adapterdeck.core.loss import answer_only_logits, sft_trainer
from adapterdeck.core.objectives import ObjectiveParams, TrainerParts, TrainingObjective
from adapterdeck.core.plugins import ObjectiveRegister

if TYPE_CHECKING:
    from transformers import Trainer


class Supervised(TrainingObjective):
    """The loss on the assistant's tokens (every other token is context), as the hosted APIs'
    supervised fine-tuning does."""

    name = "sft"
    description = "supervised fine-tuning: the cross-entropy loss on the assistant's answer tokens"

    def build_trainer(self, parts: TrainerParts, params: ObjectiveParams) -> Trainer:
        from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, TrainingArguments

        collator = (
            DataCollatorWithFlattening(return_position_ids=True)
            if parts.packing
            else DataCollatorForSeq2Seq(
                parts.tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=None
            )
        )
        # It logs the mean token accuracy with the losses, as TRL's trainers (and so ``dpo``) do.
        trainer_class = sft_trainer(answer_only=answer_only_logits(parts.base, parts.model))
        return trainer_class(
            model=parts.model,
            args=TrainingArguments(**parts.arguments),
            train_dataset=parts.data.train_ds,
            eval_dataset=parts.data.val_ds,
            data_collator=collator,
            processing_class=parts.tokenizer,
            callbacks=parts.callbacks,
        )


class DpoParams(ObjectiveParams):
    beta: float = Field(
        0.1, gt=0, description="how far the tuned model may move from the reference (smaller: further)"
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="the share of pairs assumed mislabelled (robust DPO); 0 trusts every pair",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description=(
            "weight of a supervised loss on the preferred answers added to the DPO loss (RPO, "
            "Pang et al. 2024): keeps their likelihood up, not only the margin; 0 is plain DPO"
        ),
    )


class Dpo(TrainingObjective):
    """Direct preference optimization (Rafailov et al., 2023) with TRL's ``DPOTrainer``.

    The reference model is the base under the adapter as training starts (TRL keeps a frozen
    copy of the adapter's starting weights, the size of the adapter, not of the model: no second
    model is loaded). A fresh adapter starts as the identity, so the reference is the base; a
    run continued from a published adapter is held near that adapter.
    """

    name = "dpo"
    description = "direct preference optimization on preferred / non-preferred answer pairs (TRL)"
    data_kinds = (PREFERENCES,)
    params = DpoParams
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    evaluators = ("preference_accuracy",)

    def build_trainer(self, parts: TrainerParts, params: ObjectiveParams) -> Trainer:
        from trl import DPOConfig, DPOTrainer

        assert isinstance(params, DpoParams)
        losses: dict[str, Any] = {}
        if params.sft_weight:
            losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, params.sft_weight]}
        return preference_trainer(
            parts, DPOTrainer, DPOConfig, beta=params.beta, label_smoothing=params.label_smoothing, **losses
        )


def preference_trainer(
    parts: TrainerParts, trainer_class: type[Trainer], config_class: type[Any], **options: Any
) -> Trainer:
    """A TRL preference trainer (``DPOTrainer``, ``ORPOTrainer``, ...) for the run: its config
    (``config_class``) from the run's arguments and ``options``, the split's pairs as TRL's
    conversational preference rows (``pair``)."""
    import datasets

    datasets.disable_progress_bars()  # TRL tokenizes the pairs; the run's own progress is shown
    # Tokens seen are counted on ``input_ids``, which a preference batch does not have.
    arguments = {**parts.arguments, "include_num_input_tokens_seen": "no"}
    args = config_class(
        **arguments,
        max_length=parts.data.max_length,
        gradient_checkpointing=False,
        dataset_num_proc=None,
        **options,
    )
    return trainer_class(
        model=parts.model,
        args=args,
        train_dataset=datasets.Dataset.from_list([pair(c) for c in parts.data.train]),
        eval_dataset=datasets.Dataset.from_list([pair(c) for c in parts.data.split.validation]),
        processing_class=parts.tokenizer,
        callbacks=parts.callbacks,
    )


def pair(conversation: Conversation) -> dict[str, Any]:
    """A preference example as TRL's conversational preference rows: prompt, chosen, rejected."""
    rejected = conversation.rejected
    assert rejected is not None  # the data kind was checked before training
    return {
        "prompt": conversation.prompt,
        "chosen": [{"role": "assistant", "content": conversation.reference}],
        "rejected": [{"role": "assistant", "content": rejected.reference}],
    }


@hookimpl
def register_objectives(register: ObjectiveRegister) -> None:
    register.add_objective(Supervised())
    register.add_objective(Dpo())
