"""The ``prefix`` tuning method (PEFT prefix tuning): served by the embedded PEFT engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from adapterdeck.core import hookimpl
from adapterdeck.core.methods import ENGINE_PEFT, MethodParams, TuningMethod
from adapterdeck.core.plugins import MethodRegister

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


class PrefixParams(MethodParams):
    virtual_tokens: int = Field(16, ge=1, le=512, description="learned key/value positions per layer")
    projection: bool = Field(False, description="reparameterise the prefix through an MLP while training")


class PrefixMethod(TuningMethod):
    name = "prefix"
    description = "prefix tuning (PEFT): learned key/value prefixes; served by the embedded PEFT engine"
    served_by = (ENGINE_PEFT,)
    params = PrefixParams
    default_learning_rate = 1e-2

    def apply(self, model: PreTrainedModel, params: Any) -> PeftModel:
        from peft import PrefixTuningConfig, get_peft_model

        config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=params.virtual_tokens,
            prefix_projection=params.projection,
        )
        return get_peft_model(model, config)


@hookimpl
def register_methods(register: MethodRegister) -> None:
    register.add_method(PrefixMethod())
