"""Bounded caches: the adapter directories on local disk (``AdapterCache``) and lookups in memory
(``Lru``).

The engines load an adapter from a plain directory, so the registry copies a version's files out of
the blob store into ``<cache dir>/<manifest sha256>``. vLLM's resolver (in each vLLM process) and
the gateway's PEFT engine share one cache directory per machine, so the bound is kept by whichever
process fills it and is read from the directory itself, never from one process's memory:

- recency is each directory's modification time, set on every use (``touch``), so every process
  sees the same order;
- a new copy is made in a hidden temporary directory and renamed into place when complete; only
  complete directories are ever evicted, so an adapter being copied is never touched;
- after a copy, the least recently used directories go until the cache is within
  ``max_bytes``, except the one just copied and any used within the last ``min_idle_seconds``
  (an engine may be reading it right now). An eviction renames the directory aside first and puts
  it back if it was used meanwhile;
- an evicted adapter is copied again on its next use; ``heal`` does that from the path alone
  (the manifest blob names the files), for vLLM, which reloads an adapter it resolved once from
  the same path whenever it dropped it from memory.

Lookups the gateway keeps in memory (versions, keys, the last answers it serves through an outage)
are ``Lru`` mappings: the least recently used entry goes when one more would pass the bound, so a
working set larger than the bound costs misses, never memory.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from adapterdeck.registry.errors import StorageFault
from adapterdeck.registry.private import private_dir
from adapterdeck.registry.store import SHA256_RE, BlobStore
from adapterdeck.registry.untrusted import file_name_problem

MARKER = "adapter_config.json"  # every PEFT adapter has it; a directory without it is incomplete
STALE_SECONDS = 3600.0  # a temporary or set-aside directory this old was left by a dead process

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A mapping of at most ``limit`` entries that forgets the least recently used one first.

    ``get`` and assignment make an entry the most recent; ``in`` does not. Safe to share between
    threads (lookups run in worker threads)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("an Lru holds at least one entry")
        self.limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, default: Any = None) -> Any:
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def __getitem__(self, key: K) -> V:
        with self._lock:
            self._items.move_to_end(key)
            return self._items[key]

    def __setitem__(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def pop(self, key: K, default: Any = None) -> Any:
        with self._lock:
            return self._items.pop(key, default)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass(frozen=True)
class Entry:
    """One complete adapter directory of the cache."""

    path: Path
    size: int
    used: float  # its modification time: when an engine last used it


def touch(path: Path) -> None:
    """Mark an adapter directory as used now (the cache's recency, shared by every process)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def _complete(path: Path) -> bool:
    return (path / MARKER).is_file()


class AdapterCache:
    """Adapter directories copied out of ``store`` into ``directory``, at most ``max_bytes`` of
    them but for those used within the last ``min_idle_seconds`` (see the module docstring)."""

    def __init__(
        self, store: BlobStore, directory: Path, max_bytes: int, min_idle_seconds: float = 60.0
    ) -> None:
        self.store = store
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.min_idle_seconds = min_idle_seconds

    def fill(self, manifest_sha256: str, files: list[dict[str, Any]]) -> Path:
        """The directory holding ``files`` (``path``, ``sha256``), copied now unless it is there."""
        if not SHA256_RE.fullmatch(manifest_sha256):
            raise StorageFault(f"{manifest_sha256!r:.80} is not a manifest digest; refusing to cache it")
        for f in files:
            problem = file_name_problem(f["path"])
            if problem:
                raise StorageFault(f"manifest {manifest_sha256}: refusing to write its files: {problem}")
        target = self.directory / manifest_sha256
        touch(target)  # first: an eviction running now sees it as just used and leaves it
        if _complete(target):
            return target
        private_dir(self.directory)
        tmp = self.directory / f".{manifest_sha256}.{uuid.uuid4().hex}.tmp"
        private_dir(tmp)
        try:
            for f in files:
                self.store.get_file(f["sha256"], tmp / f["path"], private=True)
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished first (the copies are identical)
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        touch(target)
        self.evict(keep=target)
        return target

    def heal(self, path: str | Path) -> bool:
        """Copy the adapter at ``path`` (a directory of this cache) back if it was evicted, from its
        manifest blob; mark it used. False when ``path`` is not one of this cache's directories."""
        path = Path(path)
        if path.parent.resolve() != self.directory.resolve() or not SHA256_RE.fullmatch(path.name):
            return False
        touch(path)
        if not _complete(path):
            manifest = json.loads(self.store.get_bytes(path.name))
            self.fill(path.name, manifest["files"])
        return True

    def entries(self) -> Iterator[Entry]:
        """Every complete adapter directory, with its size and when it was last used."""
        try:
            children = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for child in children:
            if not SHA256_RE.fullmatch(child.name):
                continue
            try:
                used = child.stat().st_mtime
                size = sum(f.stat().st_size for f in os.scandir(child.path) if f.is_file())
            except FileNotFoundError:  # evicted meanwhile
                continue
            yield Entry(Path(child.path), size, used)

    def usage(self) -> tuple[int, int]:
        """Bytes and adapters in the cache now."""
        entries = list(self.entries())
        return sum(e.size for e in entries), len(entries)

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used directories until the cache is within ``max_bytes``; returns
        how many went. ``keep`` and any directory used within ``min_idle_seconds`` stay."""
        self._sweep()
        entries = sorted(self.entries(), key=lambda e: e.used)
        total = sum(e.size for e in entries)
        removed = 0
        for entry in entries:
            if total <= self.max_bytes:
                break
            if entry.path == keep or time.time() - entry.used < self.min_idle_seconds:
                continue
            if self._remove(entry):
                total -= entry.size
                removed += 1
        return removed

    def _remove(self, entry: Entry) -> bool:
        aside = entry.path.with_name(f".{entry.path.name}.{uuid.uuid4().hex}.evicted")
        try:
            os.rename(entry.path, aside)
        except OSError:  # another process evicted it first
            return False
        try:
            used = aside.stat().st_mtime
        except FileNotFoundError:
            return False
        if used > entry.used and time.time() - used < self.min_idle_seconds:
            try:  # used while it was being set aside: it stays
                os.rename(aside, entry.path)
                return False
            except OSError:  # copied again meanwhile: this one can go
                pass
        shutil.rmtree(aside, ignore_errors=True)
        return True

    def _sweep(self) -> None:
        """Remove what dead processes left: temporary and set-aside directories over an hour old."""
        try:
            children = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for child in children:
            if child.name.startswith(".") and child.name.endswith((".tmp", ".evicted")):
                try:
                    old = time.time() - child.stat().st_mtime > STALE_SECONDS
                except FileNotFoundError:
                    continue
                if old:
                    shutil.rmtree(child.path, ignore_errors=True)
