"""The ``lora`` and ``qlora`` tuning methods (PEFT LoRA; QLoRA on a 4-bit NF4 base).

Adapters are kept to what vLLM serves: no DoRA, no bias, no modules_to_save.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from adapterdeck.core import hookimpl
from adapterdeck.core.methods import ENGINE_PEFT, ENGINE_VLLM, MethodParams, TuningMethod
from adapterdeck.core.plugins import MethodRegister

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


class LoraParams(MethodParams):
    r: int = Field(16, ge=1, le=512, description="rank of the update matrices")
    alpha: float = Field(32, gt=0, description="scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="module names to adapt; 'all-linear' = every linear layer of attention and MLP",
    )


class LoraMethod(TuningMethod):
    name = "lora"
    description = "LoRA on all linear layers of attention and MLP (PEFT); served by vLLM"
    served_by = (ENGINE_VLLM, ENGINE_PEFT)
    params = LoraParams
    default_learning_rate = 2e-4

    def apply(self, model: PreTrainedModel, params: Any) -> PeftModel:
        from peft import LoraConfig, get_peft_model

        targets = params.target_modules
        if targets == "all-linear":
            targets = linear_layer_names(model)
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=params.r,
            lora_alpha=params.alpha,
            lora_dropout=params.dropout,
            target_modules=targets,
            bias="none",
            use_dora=False,
        )
        return get_peft_model(model, config)


def linear_layer_names(model: PreTrainedModel) -> list[str]:
    """The short names (``q_proj``, ``down_proj``...) of every linear layer but the output head.

    Short names, not full paths, are what vLLM matches adapter weights against.
    """
    import torch

    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


class QLoraParams(LoraParams):
    double_quant: bool = Field(True, description="quantize the quantization constants too")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False


class QLoraMethod(LoraMethod):
    name = "qlora"
    description = "LoRA on a base loaded in 4-bit NF4 (bitsandbytes); the adapter is served by vLLM"
    params = QLoraParams

    def _quantization(self, params: Any) -> Any:
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=params.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, params.compute_dtype),
        )

    def load_base(self, base: str, params: Any, **kwargs: Any) -> PreTrainedModel:
        import bitsandbytes as bnb
        from transformers import AutoModelForCausalLM

        kwargs.pop("dtype", None)  # the quantization config decides
        model = AutoModelForCausalLM.from_pretrained(
            base, quantization_config=self._quantization(params), **kwargs
        )
        # On CPUs with AVX512-BF16, bitsandbytes switches a layer to a bf16 kernel the first time it
        # runs without gradients; evaluation would then see other numbers than training did, and a
        # merged model would not match the adapter. Keep the exact dequantize-and-matmul path.
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        return model

    def apply(self, model: PreTrainedModel, params: Any) -> PeftModel:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=params.gradient_checkpointing
        )
        return super().apply(model, params)

    def load_base_for_merge(self, base: str, params: Any, **kwargs: Any) -> PreTrainedModel:
        """The full-precision base whose linear weights are the dequantized 4-bit ones training saw."""
        import bitsandbytes as bnb
        import torch
        from transformers import AutoModelForCausalLM

        kwargs.pop("dtype", None)
        full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kwargs)
        quantized = self.load_base(base, params, **kwargs)
        with torch.no_grad():
            for name, module in quantized.named_modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                    full.get_submodule(name).weight.copy_(weight.to(torch.float32))
        del quantized
        return full


@hookimpl
def register_methods(register: MethodRegister) -> None:
    register.add_method(LoraMethod())
    register.add_method(QLoraMethod())
