"""What a training objective plugin implements.

A tuning method chooses the adapter (LoRA, QLoRA, prefix tuning, ...); an objective chooses what
it is trained to do: ``sft`` (supervised: the loss on the assistant's tokens) or ``dpo`` (direct
preference optimization on preferred / non-preferred answer pairs, TRL's ``DPOTrainer``). Any
method trains with any objective that does not refuse it (``refuses``), checked before any model
loads. An objective takes data by its format's kind (``formats.CONVERSATIONS``,
``formats.PREFERENCES``), so a third party's preference format works with ``dpo`` unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from adapterdeck.core.formats import CONVERSATIONS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

    from adapterdeck.core.config import RunConfig
    from adapterdeck.core.methods import MethodParams, TuningMethod
    from adapterdeck.core.rundata import RunData


class ObjectiveParams(BaseModel):
    """Base of an objective's parameters (``objective:`` in run.yaml); unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class TrainerParts:
    """What an objective builds its trainer from: everything adapterdeck has set up for the run.

    ``arguments`` are the ``transformers.TrainingArguments`` keywords of the run (batch size,
    learning rate, schedule, validation and checkpoints every ``eval_steps``, best checkpoint
    kept by ``eval_loss``, precision, seed); pass them to ``TrainingArguments`` or to a TRL
    config class (which extends it). ``callbacks`` show progress, stop early or on Ctrl-C and
    send what the trainer logs to the run's trackers: give them to the trainer.
    """

    config: RunConfig
    data: RunData  # validated, split and encoded; ``data.train`` and ``data.split.validation``
    model: PreTrainedModel  # the PEFT model being tuned (the base with the method's adapter)
    base: PreTrainedModel  # the base under it
    tokenizer: PreTrainedTokenizerBase
    method: TuningMethod
    method_params: MethodParams
    arguments: dict[str, Any]
    callbacks: list[TrainerCallback]
    packing: bool  # the method allows padding-free packing and the run asked for it


class TrainingObjective(ABC):
    """A training objective. Subclass it and register an instance."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: The kinds of data it trains on (``DataFormat.kind``).
    data_kinds: ClassVar[tuple[str, ...]] = (CONVERSATIONS,)
    #: Its parameters, with their defaults.
    params: ClassVar[type[ObjectiveParams]] = ObjectiveParams
    #: What it logs besides the losses (keys of the trainer's logs, without ``eval_``): shown
    #: in the report's step metrics and on each checkpoint.
    metrics: ClassVar[tuple[str, ...]] = ()
    #: Evaluators every run of it is scored with, besides the run's ``eval.evaluators``.
    evaluators: ClassVar[tuple[str, ...]] = ()

    def refuses(self, method: TuningMethod, method_params: MethodParams) -> str | None:
        """Why this objective cannot train ``method``'s adapters (None: it can)."""
        return None

    @abstractmethod
    def build_trainer(self, parts: TrainerParts, params: ObjectiveParams) -> Trainer:
        """The trainer for this run (a ``transformers.Trainer`` or a subclass, such as TRL's)."""


def data_kind_problem(objective: TrainingObjective, fmt: str, kind: str | None) -> str | None:
    """Why ``objective`` cannot train on data in format ``fmt`` of ``kind`` (None: it can)."""
    if kind in objective.data_kinds:
        return None
    return f"{fmt} data holds {kind}; objective {objective.name!r} trains on " + " or ".join(
        objective.data_kinds
    )
