"""Shared fixtures: the offline base model, the CLI in a subprocess, a real vLLM server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapterdeck.core import plugins

ROOT = Path(__file__).resolve().parents[1]
# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline demo base model, built once per test session."""
    from adapterdeck.core.basemodel import build_base_model

    return build_base_model(tmp_path_factory.mktemp("base") / "tiny-llama", seed=0)


@pytest.fixture
def fresh_plugins() -> Iterator[None]:
    """A plugin manager loaded anew for the test and forgotten afterwards."""
    plugins.reset()
    yield
    plugins.reset()


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the installed ``adapterdeck`` command as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "adapterdeck.core.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The registry home whose adapters ``vllm_server`` resolves (through adapterdeck's vLLM plugin)."""
    return tmp_path_factory.mktemp("vllm-home")


@pytest.fixture(scope="session")
def vllm_server(base_model: Path, vllm_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM OpenAI server (the CPU build) serving the demo base; yields its base URL.

    Its adapter resolver reads the registry at ``vllm_home``, so gateways started with ``--vllm-url``
    and that home serve adapters through it."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
        "ADAPTERDECK_HOME": str(vllm_home),
    }
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(base_model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--max-cpu-loras", "4",
    ]  # fmt: skip
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not ready in 300 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def pip_install(project: Path, target: Path) -> Path:
    """Install ``project`` with pip (without dependencies) into the directory ``target``, built from
    a copy so that pip's build files do not land in the source tree; returns ``target``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / project.name
        shutil.copytree(project, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
        subprocess.run([*command, str(source)], check=True, capture_output=True)
    return target
