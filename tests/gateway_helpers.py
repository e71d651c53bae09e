"""Real ``adapterdeck serve`` (and ``adapterdeck worker``) processes for the tests: ``launch`` starts
one in its own session with its output in a log file, ``wait_ready`` polls its ``/health`` until a
reply pleases a predicate, ``start_gateway`` does both for a gateway in front of a vLLM server
already running (``--vllm-url``), for the tests that need gateways but not a vLLM of their own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import yaml

from .conftest import free_port


@dataclass
class ServeProcess:
    """An ``adapterdeck serve`` or ``adapterdeck worker`` in a session of its own; its output in ``log``."""

    proc: subprocess.Popen
    log: Path

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text()[-chars:]

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM and wait (a clean shutdown); SIGKILL the process group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def launch(command: str, args: Sequence[str | Path], env: Mapping[str, str], log: Path) -> ServeProcess:
    """``adapterdeck <command> <args>`` (``serve`` or ``worker``) with ``env`` over this process's
    environment, stdout and stderr to ``log``, in a new session (so ``stop`` can kill its children)."""
    cmd = [sys.executable, "-m", "adapterdeck.core.cli", command, *map(str, args)]
    with log.open("w") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
        )
    return ServeProcess(proc, log)


def health_ok(reply: httpx.Response) -> bool:
    """Ready when ``/health`` says ``ok`` (the gateway and its engine both up)."""
    return reply.json()["status"] == "ok"


def wait_ready(
    process: ServeProcess,
    url: str,
    ready: Callable[[httpx.Response], bool] = health_ok,
    *,
    timeout: float,
    interval: float = 1.0,
    request_timeout: float = 2.0,
    headers: Mapping[str, str] | None = None,
    what: str = "serve",
) -> httpx.Response:
    """Poll ``{url}/health`` until ``ready`` likes the reply (which is returned); fail with the end of
    the process's log if it exits first (with its exit code) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = httpx.get(f"{url}/health", headers=headers, timeout=request_timeout)
            if ready(reply):
                return reply
        except (httpx.HTTPError, ValueError, KeyError):  # not up yet, or not answering JSON yet
            pass
        if (code := process.proc.poll()) is not None:
            raise AssertionError(f"{what} exited with {code} before it was ready:\n{process.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready within {timeout} s:\n{process.tail()}")
        time.sleep(interval)


@dataclass
class GatewayProcess(ServeProcess):
    url: str


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
    args = [
        "--base", base, "--served-name", served_name or str(base), "--port", str(port),
        "--vllm-url", vllm_url, "--workers", "0",
    ]  # fmt: skip
    if config is not None:
        path = workdir / f"serve-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        args += ["--config", path]
    process = launch("serve", args, env, workdir / f"gateway-{port}.log")
    gateway = cls(process.proc, process.log, f"http://127.0.0.1:{port}")
    try:
        wait_ready(gateway, gateway.url, ready, timeout=120, interval=0.3, what="gateway")
    except BaseException:
        gateway.stop()
        raise
    return gateway
