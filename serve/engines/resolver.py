"""adapterdeck's LoRA resolver for vLLM, registered under the ``vllm.general_plugins`` entry point.

vLLM loads general plugins in every one of its processes, so ``register`` only puts a resolver
object in vLLM's registry: no database is opened until a request needs an adapter. The resolver
answers only immutable references ``tenant/name@N`` (vLLM caches a resolved name for the life of
the process, so a movable alias must never reach it), only for adapters vLLM can serve, and only
when the version was published for the base vLLM is serving. The adapter's files are copied from
the blob store into the registry's bounded adapter cache (``registry/cache.py``: one directory per
manifest, renamed into place when complete, least recently used ones evicted beyond
``ADAPTERDECK_CACHE_MAX_BYTES``) in a worker thread, off vLLM's event loop.

vLLM asks a resolver only once per name for the life of its process and afterwards reloads the
adapter from the path it was given whenever it dropped it from memory (``--max-cpu-loras``), so
``register`` also wraps the path lookup of vLLM's LoRA loader (in the engine process, where it runs):
before each load, an adapter directory the cache evicted is copied back from its manifest blob, and
every load marks the directory as used. The resolver's own memory is one fingerprint per base name.
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
        self._cache: Any = None
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
            path = registry.materialize(info)
        except AdapterdeckError as exc:
            logger.warning("refusing %s: %s", lora_name, exc)
            return None
        # The directory handed to vLLM must be inside the cache, whatever the records say.
        if not path.resolve().is_relative_to(cache.resolve()):
            logger.warning("refusing %s: its files would be outside the cache %s", lora_name, cache)
            return None
        return str(path)

    def heal(self, path: str) -> None:
        """Before vLLM loads an adapter from ``path``: copy it back if the cache evicted it, mark it
        used. Opens the blob store only (no database); never raises, so vLLM's own error (a missing
        directory) is what a failure looks like."""
        try:
            with self._lock:
                if self._cache is None:
                    from adapterdeck.registry import RegistrySettings
                    from adapterdeck.registry.cache import AdapterCache
                    from adapterdeck.registry.store import BlobStore

                    settings = RegistrySettings()
                    store = BlobStore(settings.resolved_storage_url(), settings.storage_options)
                    self._cache = AdapterCache(
                        store,
                        settings.resolved_cache_dir(),
                        settings.cache_max_bytes,
                        settings.cache_min_idle_seconds,
                    )
            self._cache.heal(path)
        except Exception as exc:  # vLLM reports the load's failure itself
            logger.warning("cannot restore the evicted adapter at %s: %s", path, exc)

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
    resolver = resolver_cls()
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
    heal_before_loading(resolver)


def heal_before_loading(resolver: AdapterdeckResolver) -> None:
    """Wrap the function vLLM's LoRA loader turns ``lora_path`` into a local path with, so that
    every (re)load of an adapter goes through ``resolver.heal`` first (see the module docstring)."""
    try:
        from vllm.lora import worker_manager
    except ImportError as exc:
        logger.warning("evicted adapters cannot be restored before a reload: %s", exc)
        return
    original = getattr(worker_manager, "get_adapter_absolute_path", None)
    if original is None:
        logger.warning("evicted adapters cannot be restored: vLLM's LoRA loader has no path lookup")
        return
    if getattr(original, "adapterdeck_heals", False):
        return

    def absolute_path(lora_path: str) -> str:
        path = original(lora_path)
        resolver.heal(path)
        return path

    absolute_path.adapterdeck_heals = True  # type: ignore[attr-defined]
    worker_manager.get_adapter_absolute_path = absolute_path
