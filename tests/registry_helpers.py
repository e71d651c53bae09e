"""Helpers for the registry tests: adapters made without training, version checks, a PostgreSQL
database per test, and a warm interpreter that forks real CLI processes.

Run as a script, this file is that warm interpreter (see ``CliForker``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


# -- adapters ---------------------------------------------------------------------------------


def make_lora(base: Path, out: Path, *, seed: int = 0, safetensors: bool = True, **overrides: Any) -> Path:
    """A PEFT LoRA adapter saved straight from ``get_peft_model`` on ``base`` (random A and B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    options: dict[str, Any] = {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": LORA_TARGETS,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "init_lora_weights": False,  # B random too, so every adapter's weights are distinct
    }
    options.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    peft_model = get_peft_model(model, LoraConfig(**options))
    peft_model.save_pretrained(str(out), safe_serialization=safetensors)
    return out


def claim_vllm(adapter: Path, base: Path) -> Path:
    """Add the ``adapterdeck.json`` a LoRA training run writes: the adapter says vLLM serves it."""
    from adapterdeck.core.basemodel import fingerprint

    meta = {
        "method": "lora",
        "params": {},
        "served_by": ["vllm", "peft"],
        "base": str(base),
        "base_fingerprint": fingerprint(str(base)),
    }
    (adapter / "adapterdeck.json").write_text(json.dumps(meta, indent=2) + "\n")
    return adapter


def truncated_copy(adapter: Path, out: Path) -> Path:
    """A copy whose weights file lost its second half (an interrupted download)."""
    shutil.copytree(adapter, out)
    data = (adapter / WEIGHTS).read_bytes()
    (out / WEIGHTS).write_bytes(data[: len(data) // 2])
    return out


def variant(adapter: Path, out: Path, index: int) -> Path:
    """A copy with its own README and slightly different weights: every blob of it is new."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(adapter, out)
    with safe_open(str(adapter / WEIGHTS), "pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 0.001 * (index + 1)
    save_file(tensors, str(out / WEIGHTS), metadata=metadata)
    with (out / "README.md").open("a") as fh:
        fh.write(f"\nvariant {index}\n")
    return out


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file of an adapter directory (what a publish stores) by name, with its bytes."""
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- registry contents ------------------------------------------------------------------------


def check_version_complete(registry: Any, ref: str, dest: Path) -> dict[str, Any]:
    """Pull ``ref`` to ``dest`` and check it against its manifest blob: every file, every digest.

    Returns the manifest.
    """
    info = registry.show(ref)
    manifest = json.loads(registry.store.get_bytes(info.manifest_sha256))
    assert manifest["adapter"] == f"{info.tenant}/{info.name}"
    assert manifest["base_fingerprint"] == info.base_fingerprint
    assert manifest["peft_type"] == info.peft_type
    expected = {e["path"]: (e["sha256"], e["size"]) for e in manifest["files"]}
    assert expected, f"{ref}: the manifest lists no files"
    assert {f["path"]: (f["sha256"], f["size"]) for f in info.files} == expected
    assert sum(size for _, size in expected.values()) == info.size_bytes
    out = registry.pull(ref, dest)
    pulled = {p.name: p for p in out.iterdir()}
    assert set(pulled) == set(expected), f"{ref}: pulled {sorted(pulled)}, manifest {sorted(expected)}"
    for name, path in pulled.items():
        assert (sha256_of(path), path.stat().st_size) == expected[name], f"{ref}: {name} differs"
    return manifest


def referenced_blobs(registry: Any) -> set[str]:
    """The blobs the visible versions need: their files and their manifests."""
    needed: set[str] = set()
    for adapter in registry.list():
        for number in adapter["versions"]:
            info = registry.show(f"{adapter['adapter']}@{number}")
            needed.add(info.manifest_sha256)
            needed.update(f["sha256"] for f in info.files)
    return needed


def local_blob_names(storage: Path) -> set[str]:
    """Names of every file under a local store's ``blobs/`` (temporary files included)."""
    root = storage / "blobs"
    if not root.exists():
        return set()
    return {p.name for p in root.rglob("*") if p.is_file()}


# -- PostgreSQL -------------------------------------------------------------------------------


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database; yields its SQLAlchemy URL and drops it afterwards."""
    import psycopg

    name = f"adapterdeck_{uuid.uuid4().hex}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.format(name=name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- real CLI processes, forked from a warm interpreter -----------------------------------------


class CliForker:
    """Starts real ``adapterdeck`` CLI processes, quickly.

    A cold ``adapterdeck registry publish`` spends ~9 CPU-seconds importing torch, transformers
    and peft before it does anything. This helper starts one interpreter (this file as a script)
    that imports them once, then forks a child per CLI invocation: each child is a separate OS
    process with its own database connections that runs ``adapterdeck.core.cli.main()`` with the
    given arguments, exactly as the console script does, its output going to a log file. Children
    of one ``start`` are released together through a pipe. Their pids are real: tests SIGKILL them.
    A child is reaped only by ``wait``, so its pid cannot be reused before then.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self._stderr = (log_dir / "forker.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        ready = self._read()
        assert ready.get("ready"), ready

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the CLI forker died:\n{(self.log_dir / 'forker.log').read_text()[-4000:]}")
        return json.loads(line)

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def start(self, argv: list[str], n: int = 1) -> list[int]:
        """Fork ``n`` processes running ``adapterdeck *argv``, released at the same moment."""
        return self.start_each([argv] * n)

    def start_each(self, argvs: list[list[str]]) -> list[int]:
        """Fork a process per argument list, all released at the same moment."""
        return self._ask({"op": "start", "argvs": argvs, "log_dir": str(self.log_dir)})["pids"]

    def wait(self, pid: int) -> dict[str, Any]:
        """Reap a child: ``status`` (exit code, or -signal), ``elapsed`` seconds, ``output``."""
        result = self._ask({"op": "wait", "pid": pid})
        result["output"] = (self.log_dir / f"{pid}.log").read_text()
        return result

    def run(self, argv: list[str]) -> dict[str, Any]:
        [pid] = self.start(argv)
        return self.wait(pid)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def _child(argv: list[str], gate: int, log_dir: str) -> None:
    """In a forked child: wait for the release, run the CLI, exit with its code."""
    code = 1
    try:
        os.read(gate, 1)  # returns at EOF, when the parent closes the pipe's write end
        os.close(gate)
        log = os.open(f"{log_dir}/{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        from adapterdeck.core import cli

        sys.argv = ["adapterdeck", *argv]
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve() -> None:
    """The forker: import the heavy modules once, then fork CLI children on request."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the imports print goes to the log, not into the protocol
    import alembic.command  # noqa: F401
    import peft  # noqa: F401
    import psycopg  # noqa: F401
    import sqlalchemy.dialects.postgresql
    import sqlalchemy.dialects.sqlite  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from adapterdeck.core import cli  # noqa: F401  (loads the plugins: the registry's commands)

    released: dict[int, float] = {}
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            read_end, write_end = os.pipe()
            pids = []
            for argv in request["argvs"]:
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    os.close(write_end)
                    _child(argv, read_end, request["log_dir"])
                pids.append(pid)
            os.close(read_end)
            now = time.monotonic()
            os.close(write_end)  # go
            released.update(dict.fromkeys(pids, now))
            protocol.write(json.dumps({"pids": pids}) + "\n")
        elif request["op"] == "wait":
            pid = request["pid"]
            _, status = os.waitpid(pid, 0)
            elapsed = time.monotonic() - released.pop(pid)
            reply = {"pid": pid, "status": os.waitstatus_to_exitcode(status), "elapsed": elapsed}
            protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    _serve()
