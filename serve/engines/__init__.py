"""The engines a completion goes to: vLLM (``vllm``, started and watched by ``process``, guarded
by ``guard``, loading adapters through ``resolver``) and the embedded PEFT engine (``peft``)."""
