"""Everything adapterdeck writes into its home is private (files 0600, directories 0700) under the
usual umask 022: the registry database and its WAL files, blobs, uploaded training files, a job's
training data, run and log, the workers' and vLLM's logs, the adapter cache.

Real processes as an operator runs them: the CLI, ``adapterdeck serve`` (the gateway; once with a
vLLM it supervises, to see its log), an ``adapterdeck worker`` that really trains a job uploaded
over HTTP, on a real SQLite registry.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from adapterdeck.core.demo import write_demo_dataset
from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.tenants import create_key

from .conftest import free_port, run_cli
from .gateway_helpers import launch, start_gateway
from .registry_helpers import make_lora


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, for this process and every process it starts."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(root: Path) -> dict[Path, int]:
    """Every path under ``root`` (itself included) with its mode (type and permission bits)."""
    found = {root: root.stat().st_mode}
    for path in root.rglob("*"):
        try:
            found[path] = path.lstat().st_mode
        except FileNotFoundError:  # removed while walking (a temporary file renamed into place)
            continue
    return found


def _not_private(modes: dict[Path, int]) -> list[str]:
    return [
        f"{path}: {stat.S_IMODE(mode):o}"
        for path, mode in sorted(modes.items())
        if stat.S_IMODE(mode) != (0o700 if stat.S_ISDIR(mode) else 0o600)
    ]


class _Watcher(threading.Thread):
    """Records the mode of everything under a directory, every 0.2 s, while a job runs in it."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.seen, self._done = root, {}, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            if self.root.exists():
                self.seen.update(_modes(self.root))

    def stop(self) -> dict[Path, int]:
        self._done.set()
        self.join()
        return self.seen


def test_everything_in_the_home_is_private(base_model: Path, tmp_path: Path, umask_022: None) -> None:
    home = tmp_path / "home"
    env = {"ADAPTERDECK_HOME": str(home)}
    assert not home.exists()

    # The CLI: a tenant (the database), a published adapter (blobs).
    created = run_cli("tenant", "create", "acme", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    lora = make_lora(base_model, tmp_path / "lora", seed=5)
    published = run_cli("registry", "publish", str(lora), "acme/support", env=env)
    assert published.returncode == 0, published.stderr
    assert _not_private(_modes(home)) == []

    # The gateway (an upload, a job) and a worker that trains the job.
    gateway = start_gateway(
        base_model, f"http://127.0.0.1:{free_port()}", env, tmp_path, served_name="tiny",
        ready=lambda reply: "status" in reply.json(),  # answering (no vLLM here)
    )  # fmt: skip
    settings = tmp_path / "worker.yaml"
    settings.write_text(yaml.safe_dump({"finetune": {"poll_seconds": 0.5, "heartbeat_seconds": 0.5}}))
    watcher = _Watcher(home)
    watcher.start()
    worker = launch("worker", ["--config", settings], env, tmp_path / "worker.out")
    try:
        data = write_demo_dataset(tmp_path / "reviews.jsonl", task="sentiment", n=30, seed=4)
        with httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as http:
            upload = http.post(
                "/v1/files",
                files={"file": ("reviews.jsonl", data.read_bytes())},
                data={"purpose": "fine-tune"},
            )
            assert upload.status_code == 200, upload.text
            job = http.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": "tiny",
                    "training_file": upload.json()["id"],
                    "hyperparameters": {"n_epochs": 1, "batch_size": 8},
                    "adapterdeck": {"method": "lora", "params": {"r": 4}, "evaluators": ["loss"]},
                },
            )
            assert job.status_code == 200, job.text
            job_id = job.json()["id"]
            deadline = time.monotonic() + 600
            while (status := http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]) not in (
                "succeeded", "failed", "cancelled",
            ):  # fmt: skip
                assert time.monotonic() < deadline, "the job did not finish in 600 s"
                time.sleep(0.5)
            assert status == "succeeded", (tmp_path / "worker.out").read_text()[-3000:]
    finally:
        try:
            worker.stop(timeout=60)
        finally:
            gateway.stop()
            seen = watcher.stop()

    # What the processes wrote while they ran: SQLite's WAL files, the job's training data and run
    # (its directory is removed at the end).
    assert {home / "registry.db-wal", home / "registry.db-shm"} <= set(seen), sorted(seen)
    job_dir = home / "finetune" / job_id
    assert job_dir / "data" / "train.jsonl" in seen, sorted(seen)
    assert any(p.is_relative_to(job_dir / "run") and p.suffix == ".safetensors" for p in seen), sorted(seen)
    assert _not_private(seen) == []

    # The adapter cache the engines load from (vLLM's resolver and the PEFT engine materialize there).
    registry = Registry(RegistrySettings(home=home))
    try:
        registry.materialize(registry.show("acme/support@1"), home / "cache" / "adapters")
    finally:
        registry.close()

    modes = _modes(home)
    for expected in (
        home / "registry.db",
        home / "blobs",
        home / "finetune" / "files",
        home / "logs" / "finetune" / f"{job_id}.log",
        home / "cache" / "adapters",
    ):
        assert expected in modes, sorted(modes)
    assert (
        len(list((home / "finetune" / "files").iterdir())) == 3
    )  # the upload, step_metrics.csv, report.json
    assert _not_private(modes) == []


def test_serve_writes_vllm_s_log_and_its_own_private(
    base_model: Path, tmp_path: Path, umask_022: None
) -> None:
    home = tmp_path / "home"
    registry = Registry(RegistrySettings(home=home))
    create_key(registry, "acme")
    registry.close()
    port, vllm_port = free_port(), free_port()
    args = [
        "--base", base_model, "--port", str(port), "--vllm-port", str(vllm_port), "--workers", "1",
        "--max-model-len", "512", "--dtype", "float32",
    ]  # fmt: skip
    serve = launch("serve", args, {"ADAPTERDECK_HOME": str(home)}, tmp_path / "serve.out")
    proc = serve.proc
    logs = [home / "logs" / f"adapterdeck-vllm-{vllm_port}.log", home / "logs" / "worker-0.log"]
    try:
        deadline = time.monotonic() + 120
        while not all(log.exists() for log in logs):
            assert proc.poll() is None, (tmp_path / "serve.out").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.out").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        serve.stop(timeout=90)
    assert _not_private(_modes(home)) == []
