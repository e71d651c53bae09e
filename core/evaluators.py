"""What an evaluator plugin implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from adapterdeck.core.formats import Conversation


@dataclass(frozen=True)
class EvalSample:
    """One held-out example as a model handled it."""

    prompt: list[dict[str, str]]
    reference: str
    prediction: str | None = None  # None when the evaluator needs no generation
    loss: float | None = None  # mean loss on the reference tokens
    meta: Mapping[str, Any] = field(default_factory=dict)  # the example's ``Conversation.meta``
    #: For a preference pair: log p(preferred answer) - log p(non-preferred answer) under the
    #: model, each summed over the answer's tokens (None unless ``needs_preference``).
    margin: float | None = None


class Evaluator(ABC):
    """Scores a model on held-out examples. Subclass it and register an instance."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    #: False when only the loss is needed (no text is generated for it).
    needs_generation: ClassVar[bool] = True
    #: False when ``score`` never reads ``sample.loss`` (the loss pass over the examples is skipped).
    needs_loss: ClassVar[bool] = True
    #: True when ``score`` reads ``sample.margin`` (both answers of each preference pair are scored).
    needs_preference: ClassVar[bool] = False
    #: False when ``score`` reads only ``sample.prediction`` (and ``sample.prompt``), never the
    #: reference answer: such an evaluator can also judge live traffic, which has no reference
    #: (an experiment's ``evaluators`` and guardrails; see ``live``).
    needs_reference: ClassVar[bool] = True

    @classmethod
    def live(cls) -> bool:
        """Whether this evaluator can score a served answer on its own (no reference, no loss, no
        preference pair, no probe set of its own)."""
        return (
            cls.needs_generation
            and not cls.needs_reference
            and not cls.needs_loss
            and not cls.needs_preference
            and cls.examples is Evaluator.examples
        )

    #: Most generated answer tokens this evaluator's own examples need (see ``examples``).
    max_new_tokens: ClassVar[int] = 64

    def examples(self) -> Sequence[Conversation] | None:
        """A fixed probe set this evaluator brings, scored instead of the run's test examples.

        None (the default) scores the run's test split. An evaluator that measures something
        besides the task, such as general capability lost to tuning, returns its own
        conversations; ``meta`` on each reaches ``score`` as ``sample.meta``.
        """
        return None

    @abstractmethod
    def score(self, sample: EvalSample) -> float:
        """Score one sample."""

    def aggregate(self, scores: Sequence[float]) -> float:
        """Combine the per-sample scores into the headline figure (the mean unless overridden)."""
        return sum(scores) / len(scores) if scores else float("nan")

    def details(self, scores: Sequence[float]) -> dict[str, float]:
        """Further figures for the report besides the headline (none unless overridden)."""
        return {}
