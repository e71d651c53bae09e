"""A real ``adapterdeck serve`` gateway in a subprocess, in front of a vLLM server already running
(``--vllm-url``), for the tests that need gateways but not a vLLM of their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import yaml

from .conftest import free_port


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """SIGTERM and wait (a clean shutdown); SIGKILL the process group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


G = TypeVar("G", bound=GatewayProcess)


def start_gateway(
    base: Path,
    vllm_url: str,
    env: dict[str, str],
    workdir: Path,
    config: dict | None = None,
    *,
    served_name: str | None = None,
    cls: type[G] = GatewayProcess,  # type: ignore[assignment]
    ready: Callable[[httpx.Response], bool] = lambda reply: True,
) -> G:
    """Start a gateway (no fine-tuning workers) and wait until ``/health`` answers to ``ready``'s liking."""
    port = free_port()
    log = workdir / f"gateway-{port}.log"
    cmd = [
        sys.executable, "-m", "adapterdeck.core.cli", "serve", "--base", str(base),
        "--served-name", served_name or str(base), "--port", str(port), "--vllm-url", vllm_url,
        "--workers", "0",
    ]  # fmt: skip
    if config is not None:
        path = workdir / f"serve-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd += ["--config", str(path)]
    with log.open("w") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
        )
    gateway = cls(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 120
    while True:
        try:
            if ready(httpx.get(f"{gateway.url}/health", timeout=2)):
                return gateway
        except (httpx.HTTPError, ValueError, KeyError):  # not up yet, or not answering JSON yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            gateway.stop()
            raise AssertionError(f"gateway did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
