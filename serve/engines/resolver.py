"""adapterdeck's LoRA resolver for vLLM, registered under the ``vllm.general_plugins`` entry point.

vLLM loads general plugins in every one of its processes, so ``register`` only puts a resolver
object in vLLM's registry: no database is opened until a request needs an adapter. The resolver
answers only immutable references ``tenant/name@N`` (vLLM caches a resolved name for the life of
the process, so a movable alias must never reach it), only for adapters vLLM can serve, and only
when the version was published for the base vLLM is serving. The adapter's files are copied from
the blob store into a local cache directory (one per manifest, renamed into place when complete)
in a worker thread, off vLLM's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

RESOLVER_NAME = "adapterdeck"
logger = logging.getLogger("adapterdeck.vllm_resolver")


class AdapterdeckResolver:
    """Resolves ``tenant/name@N`` to a local PEFT directory (see the module docstring)."""

    def __init__(self) -> None:
        self._registry: Any = None
        self._base_fingerprints: dict[str, str] = {}
        self._lock = threading.Lock()

    def _open(self) -> Any:
        with self._lock:
            if self._registry is None:
                from adapterdeck.registry import Registry, RegistrySettings

                # The registry of the gateway that started vLLM: RegistrySettings.child_env()
                # put it in this process's environment.
                self._registry = Registry(RegistrySettings())
            return self._registry

    def _base_fingerprint(self, base_model_name: str) -> str:
        if base_model_name not in self._base_fingerprints:
            from adapterdeck.core.basemodel import fingerprint

            self._base_fingerprints[base_model_name] = fingerprint(base_model_name)
        return self._base_fingerprints[base_model_name]

    def materialize(self, base_model_name: str, lora_name: str) -> str | None:
        """The local directory holding ``lora_name``'s files, or None when it must not be served."""
        from adapterdeck.core.errors import AdapterdeckError
        from adapterdeck.core.formats import shown
        from adapterdeck.core.methods import ENGINE_VLLM
        from adapterdeck.registry.refs import InvalidRef, parse_ref

        # Names come from API clients: log them with repr, cut short, never as they are.
        try:
            ref = parse_ref(lora_name)
        except InvalidRef as exc:
            logger.warning("refusing %s: %s", shown(lora_name), exc)
            return None
        if not ref.immutable:
            logger.warning("refusing %s: only immutable tenant/name@N references are served", lora_name)
            return None
        registry = self._open()
        try:
            info = registry.show(ref)
        except AdapterdeckError:
            return None
        if ENGINE_VLLM not in info.served_by:
            logger.warning("refusing %s: its adapters are not served by vLLM (%s)", lora_name, info.served_by)
            return None
        if info.base_fingerprint != self._base_fingerprint(base_model_name):
            logger.warning("refusing %s: it was published for another base (%s)", lora_name, base_model_name)
            return None
        cache = registry.settings.resolved_cache_dir()
        try:
            path = registry.materialize(info, cache)
        except AdapterdeckError as exc:
            logger.warning("refusing %s: %s", lora_name, exc)
            return None
        # The directory handed to vLLM must be inside the cache, whatever the records say.
        if not path.resolve().is_relative_to(cache.resolve()):
            logger.warning("refusing %s: its files would be outside the cache %s", lora_name, cache)
            return None
        return str(path)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        from vllm.lora.request import LoRARequest

        path = await asyncio.to_thread(self.materialize, base_model_name, lora_name)
        if path is None:
            return None
        # vLLM assigns the integer id itself when it loads a resolved adapter.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=path)


def register() -> None:
    """vLLM's entry point: add the resolver once per process (idempotent, opens nothing)."""
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        return
    resolver_cls = type("AdapterdeckLoRAResolver", (AdapterdeckResolver, LoRAResolver), {})
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver_cls())
