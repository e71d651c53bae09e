"""``adapterdeck serve``'s own fine-tuning workers: ``adapterdeck worker`` processes on this
machine, on the gateway's registry, restarted if they die and stopped with it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from adapterdeck.registry.private import PRIVATE_UMASK, create_private, private_dir
from adapterdeck.serve.finetune.parent import PARENT_ENV, WORKER_INDEX_ENV
from adapterdeck.serve.settings import ServeSettings

logger = logging.getLogger("adapterdeck.worker")


class LocalWorkers:
    """``adapterdeck serve``'s own workers: ``adapterdeck worker`` processes, restarted if they die."""

    def __init__(self, settings: ServeSettings, env: dict[str, str], log_dir: Path) -> None:
        self.settings = settings
        self.env = env
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen | None] = [None] * settings.finetune.workers
        self.restarts = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "adapterdeck.core.cli",
            "worker",
            "--settings-json",
            self.settings.model_dump_json(),
        ]

    def start(self) -> None:
        private_dir(self.log_dir)
        for index in range(len(self.processes)):
            thread = threading.Thread(
                target=self._supervise, args=(index,), name=f"worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _supervise(self, index: int) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            env = {**os.environ, **self.env, PARENT_ENV: str(os.getpid()), WORKER_INDEX_ENV: str(index)}
            log_path = self.log_dir / f"worker-{index}.log"
            create_private(log_path)
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    self.command(),
                    stdout=log,
                    stderr=log,
                    env=env,
                    start_new_session=True,
                    umask=PRIVATE_UMASK,
                )
            self.processes[index] = proc
            started = time.monotonic()
            logger.info("fine-tuning worker %d started (pid %d)", index, proc.pid)
            code = proc.wait()
            if self._stopping.is_set():
                return
            self.restarts += 1
            backoff = 1.0 if time.monotonic() - started > 60 else min(60.0, backoff * 2)
            logger.warning("fine-tuning worker %d exited with %s; restarting in %.0f s", index, code, backoff)
            self._stopping.wait(backoff)

    def stop(self) -> None:
        """SIGTERM every worker (each puts its running job back in the queue), then wait."""
        self._stopping.set()
        for proc in self.processes:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + self.settings.finetune.stop_grace_seconds + 20
        for proc in self.processes:
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for thread in self._threads:
            thread.join(timeout=5)
