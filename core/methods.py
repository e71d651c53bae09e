"""What a tuning method plugin implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

# Engines an adapter can be served by. A method lists the ones its adapters work on.
ENGINE_VLLM = "vllm"
ENGINE_PEFT = "peft"
ENGINES: tuple[str, ...] = (ENGINE_VLLM, ENGINE_PEFT)


class MethodParams(BaseModel):
    """Base of a method's parameters; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")


class TuningMethod(ABC):
    """A parameter-efficient tuning method. Subclass it and register an instance."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: Engines that can serve this method's adapters, preferred first.
    served_by: ClassVar[tuple[str, ...]] = (ENGINE_PEFT,)
    #: The method's parameters, with their defaults.
    params: ClassVar[type[MethodParams]] = MethodParams
    #: Learning rate used when the run config does not set one.
    default_learning_rate: ClassVar[float] = 2e-4

    def load_base(self, base: str, params: MethodParams, **kwargs: Any) -> PreTrainedModel:
        """Load the base model for training (override to quantize, for example)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(base, **kwargs)

    @abstractmethod
    def apply(self, model: PreTrainedModel, params: MethodParams) -> PeftModel:
        """Wrap the base model with trainable adapter weights."""

    def load_base_for_merge(self, base: str, params: MethodParams, **kwargs: Any) -> PreTrainedModel:
        """The full-precision base an adapter of this method is merged into (see ``export --merge``).

        Override when training saw different base weights than the plain checkpoint, as with a
        quantized base: merge into the weights the adapter was trained against.
        """
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(base, **kwargs)
