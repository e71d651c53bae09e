"""Start, watch and restart the vLLM OpenAI server that serves the base and every LoRA adapter.

vLLM runs as its own process group (``python -m vllm.entrypoints.openai.api_server``) with
runtime LoRA loading on; adapterdeck's resolver plugin (registered under
``vllm.general_plugins``) loads ``tenant/name@N`` from the registry on first use. If the process
dies it is started again after a short backoff; while it is down, requests fail fast with 503
(or, with several replicas, go to the others: ``adapterdeck serve --replicas N`` runs one
supervisor per replica, each on its own port, log and share of the cores or GPUs:
``placement_env``).

Only the gateway may reach it: every start gets a new random API key (in vLLM's environment,
``VLLM_API_KEY``, never on its command line, which any user of the machine can read), which the
gateway sends on every call, and ``EngineGuard`` (``guard.py``) requires it on every
path but ``/health`` and refuses the runtime-loading routes outright.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import httpx

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.serve.settings import ServeSettings

logger = logging.getLogger("adapterdeck.serve")
GUARD = "adapterdeck.serve.engines.guard.EngineGuard"
LOG_TAIL_LINES = 20
PORT_RETRY_SECONDS = 10.0
T = TypeVar("T")


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """True when something already listens on (or holds) ``host:port``. Bound as vLLM's server
    binds (``SO_REUSEADDR``), so the closing connections of a vLLM that just died do not count."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def check_vllm_port(settings: ServeSettings) -> None:
    """Fail with one line when a port of the vLLM servers to start is taken."""
    for i in range(settings.vllm.local_replicas()):
        port = settings.vllm.port + i
        if port_taken(port):
            raise AdapterdeckError(
                f"vLLM's port {port} on 127.0.0.1 is taken by another process: free it, or give vLLM "
                "another port (--vllm-port, or vllm.port in --config), or use a running vLLM (--vllm-url)"
            )


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs this machine lets vLLM use: ``CUDA_VISIBLE_DEVICES`` when set, else every
    ``/dev/nvidiaN`` (none on a CPU machine)."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [
            d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"
        ]
    return sorted((p.name[6:] for p in Path("/dev").glob("nvidia[0-9]*")), key=int)


def share(items: Sequence[T], index: int, count: int) -> list[T]:
    """Replica ``index``'s contiguous share of ``items`` split ``count`` ways (one item each, in
    turn, when there are fewer items than replicas)."""
    if count > len(items):
        return [items[index % len(items)]] if items else []
    return list(items[index * len(items) // count : (index + 1) * len(items) // count])


def placement_env(index: int, count: int, cpus: Sequence[int], gpus: Sequence[str]) -> dict[str, str]:
    """The environment that gives replica ``index`` of ``count`` its own devices: on a GPU machine
    its GPUs (``CUDA_VISIBLE_DEVICES``), else its cores (vLLM's ``VLLM_CPU_OMP_THREADS_BIND``). One
    replica gets nothing: vLLM's own choice, as with no fleet."""
    if count <= 1:
        return {}
    if gpus:
        return {"CUDA_VISIBLE_DEVICES": ",".join(share(gpus, index, count))}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, share(sorted(cpus), index, count)))}


def log_tail(path: Path, start: int, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines written to ``path`` after byte ``start``."""
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class VllmSupervisor:
    def __init__(
        self, settings: ServeSettings, env: dict[str, str], log_path: Path, port: int | None = None
    ) -> None:
        self.settings = settings
        self.env = env
        self.log_path = log_path
        self.port = settings.vllm.port if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.restarts = 0
        self.started_at: float | None = None
        self.last_exit: int | None = None
        self._stopping = False
        self._failures = 0
        self._task: asyncio.Task | None = None
        self.api_key = secrets.token_urlsafe(32)  # a new one at every start

    def command(self) -> list[str]:
        v = self.settings.vllm
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.settings.base,
            "--served-model-name", self.settings.base_name(),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", v.dtype,
            "--enable-lora",
            "--max-loras", str(v.max_loras),
            "--max-cpu-loras", str(v.max_cpu_loras),
            "--max-lora-rank", str(v.max_lora_rank),
            "--middleware", GUARD,
        ]  # fmt: skip
        if v.max_model_len:
            cmd += ["--max-model-len", str(v.max_model_len)]
        if v.nice:  # `nice` execs vLLM: same process, lower priority
            cmd = ["nice", "-n", str(v.nice), *cmd]
        return cmd + list(v.extra_args)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"vllm-supervisor-{self.port}")

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.api_key = secrets.token_urlsafe(32)
        env = {
            **os.environ,
            **self.env,
            "VLLM_API_KEY": self.api_key,  # vLLM's own check of /v1/*; EngineGuard checks the rest
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get(
                "VLLM_CPU_KVCACHE_SPACE", str(self.settings.vllm.kv_cache_gib)
            ),
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            return await asyncio.create_subprocess_exec(
                *self.command(), stdout=log, stderr=log, env=env, start_new_session=True
            )
        finally:
            log.close()

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> bool:
        deadline = time.monotonic() + self.settings.vllm.startup_timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline and process.returncode is None:
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        return False

    async def _run(self) -> None:
        while not self._stopping:
            self.ready.clear()
            if port_taken(self.port):
                logger.error(
                    "vLLM cannot start: its port %d on 127.0.0.1 is taken by another process "
                    "(vllm.port, --vllm-port); retrying in %.0f s",
                    self.port,
                    PORT_RETRY_SECONDS,
                )
                await asyncio.sleep(PORT_RETRY_SECONDS)
                continue
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.process = await self._spawn()
            self.started_at = time.monotonic()
            logger.info("vLLM starting (pid %s), log: %s", self.process.pid, self.log_path)
            became_ready = await self._wait_ready(self.process)
            if became_ready:
                self.ready.set()
                logger.info("vLLM ready at %s", self.url)
            self.last_exit = await self.process.wait()
            self.ready.clear()
            if self._stopping:
                break
            if not became_ready:
                tail = log_tail(self.log_path, log_start)
                logger.error(
                    "vLLM exited with %s during start-up; the last lines of %s:\n%s",
                    self.last_exit,
                    self.log_path,
                    tail or "(nothing)",
                )
            self.restarts += 1
            # A process that served for a while restarts at once; one that keeps failing to
            # start backs off (doubling, up to a minute) instead of spinning.
            quick = time.monotonic() - (self.started_at or 0) < 60
            self._failures = self._failures + 1 if quick else 0
            delay = min(60.0, self.settings.vllm.restart_backoff * (2**self._failures))
            logger.warning(
                "vLLM exited with %s; restarting in %.0f s (restart %d)", self.last_exit, delay, self.restarts
            )
            await asyncio.sleep(delay)

    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None

    async def stop(self) -> None:
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=20)
            except TimeoutError:
                _signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
