"""The ``prefix`` tuning method (PEFT prefix tuning): served by the embedded PEFT engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from adapterdeck.core import hookimpl
from adapterdeck.core.methods import ENGINE_PEFT, MethodParams, TuningMethod
from adapterdeck.core.plugins import MethodRegister

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


# What the prefix starts as on a pretrained base: the keys and values this neutral instruction
# leaves in every layer. A random prefix is noise that a real model attends to, and it makes the
# model worse before training can make it better; text it has seen keeps it the model it was.
DEFAULT_INIT_TEXT = (
    "Read the request carefully and answer it exactly as asked, in the format that is asked for."
)


class PrefixParams(MethodParams):
    virtual_tokens: int = Field(16, ge=1, le=512, description="learned key/value positions per layer")
    projection: bool = Field(False, description="reparameterise the prefix through an MLP while training")
    init: Literal["text", "random"] = Field(
        "text", description="start from the keys/values of init_text in the base (text) or at random"
    )
    init_text: str = Field(DEFAULT_INIT_TEXT, min_length=1, description="the text of init: text")


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
        peft_model = get_peft_model(model, config)
        if params.init == "text" and not params.projection:
            init_from_text(peft_model, params.init_text)
        return peft_model


def init_from_text(peft_model: PeftModel, text: str) -> None:
    """Set the prefix to the keys and values ``text`` (repeated or cut to the prefix length) has
    in each layer of the base, laid out as PEFT's prefix encoder stores them."""
    import torch
    from transformers import AutoTokenizer

    config = peft_model.active_peft_config
    base = peft_model.get_base_model()
    tokenizer = AutoTokenizer.from_pretrained(base.name_or_path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = config.num_virtual_tokens
    ids = (ids * (n // len(ids) + 1))[:n]
    device = next(base.parameters()).device
    with torch.no_grad():
        cache = base(input_ids=torch.tensor([ids], device=device), use_cache=True).past_key_values
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        # (layers * 2, heads, tokens, head_dim) -> (tokens, layers * 2 * heads * head_dim)
        stacked = torch.stack([kv[0] for pair in layers for kv in pair])
        weight = stacked.permute(2, 0, 1, 3).reshape(n, -1)
        embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
        if weight.shape != embedding.weight.shape:
            raise ValueError(
                f"prefix from text: got keys/values of shape {tuple(weight.shape)}, "
                f"the prefix holds {tuple(embedding.weight.shape)}"
            )
        embedding.weight.copy_(weight.to(embedding.weight.dtype))


@hookimpl
def register_methods(register: MethodRegister) -> None:
    register.add_method(PrefixMethod())
