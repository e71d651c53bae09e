"""Content-addressed blob storage on any fsspec filesystem (a local directory, S3, ...).

A blob lives at ``blobs/<first two hex digits>/<sha256>`` and is never modified: writing the
same content twice stores it once. Files kept by name (uploaded fine-tuning files) live beside the
blobs, in ``FileStore`` folders of the same storage. Every write goes through one path: locally to
a temporary name renamed into place, readable by their owner only (files 0600, directories 0700);
object stores make a PUT visible whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from adapterdeck.registry.errors import StorageFault
from adapterdeck.registry.private import make_private, private_dir

CHUNK = 1 << 20
SHA256_RE = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class BlobStore:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise StorageFault(f"cannot use storage {url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, sha: str) -> str:
        # A digest read back from the database or a manifest becomes part of a path: only 64 hex digits.
        if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
            raise StorageFault(f"{sha!r:.80} is not a sha256 digest; the registry's records are damaged")
        return f"{self.root}/blobs/{sha[:2]}/{sha}"

    def place(self, target: str, write: Callable[[str], None]) -> None:
        """Write ``target`` with ``write(path)``: locally through a temporary name renamed into place."""
        if not self.local:
            write(target)  # an object store makes a PUT visible whole
            return
        private_dir(Path(target).parent)
        tmp = f"{target}.{uuid.uuid4().hex}.tmp"
        write(tmp)
        make_private(tmp)
        os.replace(tmp, target)

    def put_file(self, local: str | Path, sha: str) -> bool:
        """Store a file under its digest; False when it was already there."""
        target = self.path(sha)
        if self.fs.exists(target):
            return False
        self.place(target, lambda path: self.fs.put_file(str(local), path))
        return True

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if not self.fs.exists(target):
            self.place(target, lambda path: self.fs.pipe_file(path, data))
        return sha

    def get_bytes(self, sha: str) -> bytes:
        try:
            data = self.fs.cat_file(self.path(sha))
        except FileNotFoundError:
            raise StorageFault(f"blob {sha} is missing from {self.url}") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise StorageFault(f"blob {sha} is corrupt in {self.url}")
        return data

    def get_file(self, sha: str, dest: str | Path, *, private: bool = False) -> None:
        """Copy a blob to ``dest``, checking its digest; ``dest`` appears only when complete (with
        mode 0600 when ``private``)."""
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.fs.get_file(self.path(sha), str(tmp))
        except FileNotFoundError:
            raise StorageFault(f"blob {sha} is missing from {self.url}") from None
        if sha256_file(tmp) != sha:
            tmp.unlink(missing_ok=True)
            raise StorageFault(f"blob {sha} is corrupt in {self.url}")
        if private:
            make_private(tmp)
        os.replace(tmp, dest)

    def blobs(self) -> Iterator[tuple[str, float]]:
        """Every stored blob's digest and age in seconds (temporary files included, as their own names)."""
        base = f"{self.root}/blobs"
        if not self.fs.exists(base):
            return
        now = time.time()
        for path, info in self.fs.find(base, detail=True).items():
            name = path.rsplit("/", 1)[-1]
            yield name, now - _mtime(info, now)

    def delete(self, name: str) -> None:
        path = f"{self.root}/blobs/{name[:2]}/{name}"
        self.fs.rm_file(path)


class FileStore:
    """Files by name under ``<storage>/<folder>/``, written as blobs are; apart from the blobs, so
    ``registry gc`` never sees them. A file is checked against the digest recorded for it on read."""

    def __init__(self, blobs: BlobStore, folder: str) -> None:
        self.blobs = blobs
        self.url = f"{blobs.url.rstrip('/')}/{folder}"
        self.root = f"{blobs.root}/{folder}"

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def put_file(self, name: str, local: str | Path) -> None:
        self.blobs.place(self.path(name), lambda path: self.blobs.fs.put_file(str(local), path))

    def put_bytes(self, name: str, data: bytes) -> None:
        self.blobs.place(self.path(name), lambda path: self.blobs.fs.pipe_file(path, data))

    def read(self, name: str, sha256: str) -> bytes:
        try:
            data = self.blobs.fs.cat_file(self.path(name))
        except FileNotFoundError:
            raise StorageFault(f"the content of {name} is missing from {self.url}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StorageFault(f"the content of {name} is corrupt in {self.url}")
        return data

    def delete(self, name: str) -> None:
        try:
            self.blobs.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass


def _mtime(info: dict[str, Any], default: float) -> float:
    for key in ("mtime", "LastModified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return value.timestamp()
        return float(value)
    return default
