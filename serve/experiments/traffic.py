"""The running A/B experiments of a gateway, and the recorder of the requests they route.

The gateway keeps every running experiment in memory and, every ``INTERVAL`` seconds, re-reads them
from the registry database (so a change made anywhere, the CLI or another gateway, is live within
a second; a change made through this gateway's own API is live at once) and writes the requests
served since in one batch (feedback on a response not yet written flushes first). When the
database cannot be reached the last known experiments keep routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from sqlalchemy.exc import SQLAlchemyError

from adapterdeck.registry import Registry
from adapterdeck.registry.experiments import Experiment, Experiments, Variant
from adapterdeck.serve.metrics import Metrics
from adapterdeck.serve.outage import DatabaseStatus
from adapterdeck.serve.target import Outcome

logger = logging.getLogger("adapterdeck.serve.experiments")
INTERVAL = 0.25
SHADOW_CONCURRENCY = 16
MAX_PENDING = 100_000
USER_HEADER = "x-user-id"
GUARD_INTERVAL = 2.0  # seconds between two checks of the experiments' guardrails
PRUNE_INTERVAL = 60.0  # seconds between two applications of the experiments' retention
LIVE = "_live"  # a noted row's (evaluators, prompt, answer) until it is scored


def score_live(evaluators: list[str], prompt: Any, text: str) -> dict[str, float] | None:
    """Each live evaluator's score of one served answer (one that fails is left out and logged)."""
    from adapterdeck.core.evaluators import EvalSample
    from adapterdeck.core.plugins import catalog

    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt or "")}]
    sample = EvalSample(prompt=messages, reference="", prediction=text)
    scores: dict[str, float] = {}
    plugins = catalog()
    for name in evaluators:
        try:
            value = float(plugins.evaluator(name).score(sample))
        except Exception:
            logger.exception("live evaluator %s failed on an answer", name)
            continue
        if math.isfinite(value):
            scores[name] = value
    return scores or None


def user_id(body: dict[str, Any], request: Request) -> str | None:
    """Who the caller is, for sticky assignment: ``user``, else ``X-User-Id``, else the API key."""
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    header = request.headers.get(USER_HEADER)
    if header:
        return f"user:{header}"
    key = request.headers.get("authorization", "").partition(" ")[2].strip()
    return "key:" + hashlib.sha256(key.encode()).hexdigest() if key else None


class Traffic:
    """Running experiments (refreshed from the database) and the recorder of their requests."""

    def __init__(self, registry: Registry, database: DatabaseStatus, metrics: Metrics | None = None) -> None:
        self.store = Experiments(registry)
        self.metrics = metrics
        self._guarded_at = 0.0
        self._pruned_at = time.monotonic()
        self.database = database
        self.running: dict[str, Experiment] = {}
        self.pending: list[dict[str, Any]] = []
        self.writing: list[dict[str, Any]] = []
        self._flush_lock = asyncio.Lock()
        self.shadow_slots = asyncio.Semaphore(SHADOW_CONCURRENCY)
        self.shadow_tasks: set[asyncio.Task[Any]] = set()
        self._unreadable = False
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._loop_task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self.shadow_tasks:
            await asyncio.wait(self.shadow_tasks, timeout=30)
        await self.flush()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            await self.refresh()
            await self.flush()
            if time.monotonic() - self._guarded_at >= GUARD_INTERVAL:
                self._guarded_at = time.monotonic()
                await self.guard()
            if time.monotonic() - self._pruned_at >= PRUNE_INTERVAL:
                self._pruned_at = time.monotonic()
                await self.prune()

    async def prune(self) -> None:
        """Apply the running experiments' retention (see registry/experiments/retention.py)."""
        for experiment in list(self.running.values()):
            if not experiment.settings.retention:
                continue
            try:
                await asyncio.to_thread(self.store.prune, experiment.adapter, experiment_id=experiment.id)
            except Exception as exc:
                logger.warning("cannot apply the retention of experiment %s: %s", experiment.adapter, exc)

    async def guard(self) -> None:
        """Apply the running experiments' own rules (guardrails, auto-promote) to what they have
        recorded: a breach stops the experiment (traffic back to the control), a win with every
        guardrail holding promotes. Another gateway may have acted first: then nothing happens."""
        for experiment in list(self.running.values()):
            settings = experiment.settings
            if not settings.guardrails and not settings.auto_promote:
                continue
            try:
                decision = await asyncio.to_thread(self.store.enforce, experiment.adapter)
            except Exception as exc:
                logger.warning("cannot check the rules of experiment %s: %s", experiment.adapter, exc)
                continue
            if decision is None:
                continue
            logger.warning("experiment %s: %s", experiment.adapter, decision["reason"])
            if self.metrics is not None:
                self.metrics.experiment_decisions.labels(
                    experiment.adapter,
                    decision["variant"],
                    decision["decision"],
                    decision.get("metric") or "",
                ).inc()
            await self.refresh()

    async def refresh(self) -> None:
        """Re-read the running experiments; on failure keep routing with the last known."""
        try:
            running = await asyncio.to_thread(self.store.running)
        except SQLAlchemyError as exc:
            self.database.failed(exc)
            return
        except Exception as exc:
            if not self._unreadable:
                logger.warning("cannot read experiments (routing with the last known): %s", exc)
            self._unreadable = True
            return
        self.database.answered()
        self.running, self._unreadable = running, False

    def lookup(self, adapter: str) -> Experiment | None:
        return self.running.get(adapter)

    def note(self, row: dict[str, Any]) -> None:
        if len(self.pending) < MAX_PENDING:
            self.pending.append({**row, "at": datetime.now(UTC)})

    @staticmethod
    def sample(experiment: Experiment, outcome: Outcome, body: dict[str, Any]) -> None:
        """Have ``outcome`` keep the answer's text when the experiment's live evaluators are to
        score it (a share ``eval_sample`` of the answers)."""
        settings = experiment.settings
        if settings.evaluators and random.random() < settings.eval_sample:
            outcome.keep_text = True
            outcome.prompt = body.get("messages", body.get("prompt"))

    def record(
        self,
        experiment: Experiment,
        variant: Variant,
        outcome: Outcome,
        status: int,
        seconds: float,
        *,
        shadow: bool = False,
        output: str | None = None,
    ) -> None:
        """Note a request ``variant`` served (written with the next flush); a sampled answer is
        scored by the experiment's live evaluators on the way."""
        usage = outcome.usage or {}
        live = None
        if outcome.keep_text and status == 200 and outcome.text is not None:
            live = (experiment.settings.evaluators, outcome.prompt, outcome.text)
        self.note(
            {
                LIVE: live,
                "evals": None,
                "response_id": outcome.response_id or f"failed-{uuid.uuid4().hex}",
                "experiment_id": experiment.id,
                "variant": variant.name,
                "shadow": int(shadow),
                "status": status,
                "latency_ms": round(seconds * 1000),
                "prompt_tokens": usage.get("prompt_tokens") or 0,
                "completion_tokens": usage.get("completion_tokens") or 0,
                "output": output,
            }
        )

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """Score the sampled answers with their live evaluators, then write every row."""
        for row in rows:
            if row.get(LIVE) is not None:
                row["evals"] = score_live(*row[LIVE])
        self.store.record([{k: v for k, v in row.items() if k != LIVE} for row in rows])

    def has_pending(self, response_id: str) -> bool:
        """Whether ``response_id`` is noted but not yet written (queued, or in a flush under way)."""
        return any(r["response_id"] == response_id for r in (*self.pending, *self.writing))

    async def flush(self) -> None:
        """Write the noted requests; one flush at a time, so a caller that waits sees them written."""
        async with self._flush_lock:
            rows, self.pending = self.pending, []
            if not rows:
                return
            self.writing = rows
            try:
                await asyncio.to_thread(self._write, rows)
            except Exception as exc:
                logger.warning("cannot record %d experiment requests (will retry): %s", len(rows), exc)
                self.pending = (rows + self.pending)[:MAX_PENDING]
            finally:
                self.writing = []
