"""The embedded PEFT engine: serves adapters vLLM cannot (prefix tuning, IA3...) in the gateway process.

Requests wait a few milliseconds in a queue so that several arrive together; they are grouped by
adapter and each group is answered by one batched ``generate`` call (left padding), so concurrent
requests are never handled one at a time. The base model is loaded once, on the first request;
each adapter is loaded once into the same ``PeftModel`` (by its immutable ref) and switched per
group; at most ``peft_max_adapters`` are held, the least recently used one unloaded when another
comes (it is loaded again from the registry's bounded adapter cache on its next use). Streaming
requests get the answer as one SSE chunk followed by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from adapterdeck.core.basemodel import load_tokenizer, render_chat
from adapterdeck.registry import Registry
from adapterdeck.serve.metrics import Metrics
from adapterdeck.serve.settings import ServeSettings
from adapterdeck.serve.target import Outcome, Target

DEFAULT_MAX_TOKENS = 128


@dataclass
class _Pending:
    path: str
    body: dict[str, Any]
    ref: str
    future: asyncio.Future = field(repr=False)


class PeftEngine:
    def __init__(self, settings: ServeSettings, registry: Registry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        # One thread runs the model: torch does its own parallelism inside a call.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peft-engine")
        self.model: Any = None
        self.tokenizer: Any = None
        self.loaded: OrderedDict[str, str] = OrderedDict()  # ref -> PEFT adapter name, oldest first
        self.batches = 0
        self.largest_batch = 0
        self._worker: asyncio.Task | None = None
        self._lock = threading.Lock()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.model is not None else "idle",
            "adapters": len(self.loaded),
            "batches": self.batches,
            "largest_batch": self.largest_batch,
        }

    async def forward(self, path: str, body: dict[str, Any], target: Target, outcome: Outcome) -> Response:
        """Answer a completion for ``target`` (a stream gets the answer as one chunk)."""
        payload = await self.complete(path, body, target.name)
        outcome.answered(payload)
        if body.get("stream"):
            return StreamingResponse(
                self.as_stream(payload), media_type="text/event-stream", headers=target.headers
            )
        return JSONResponse(payload, headers=target.headers)

    async def complete(self, path: str, body: dict[str, Any], ref: str) -> dict[str, Any]:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="peft-engine")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(path, body, ref, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.settings.peft_batch_wait_ms / 1000
            while len(batch) < self.settings.peft_max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            groups: dict[tuple[str, str], list[_Pending]] = defaultdict(list)
            for item in batch:
                groups[(item.ref, item.path)].append(item)
            for (ref, path), items in groups.items():
                try:
                    results = await loop.run_in_executor(self.executor, self._generate, ref, path, items)
                except Exception as exc:  # a bad adapter must not kill the engine
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                for item, result in zip(items, results, strict=True):
                    if not item.future.done():
                        item.future.set_result(result)

    # -- runs in the engine thread -----------------------------------------------------------------

    def _ensure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM

        self.tokenizer = load_tokenizer(self.settings.base)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.settings.base)
        self.model.eval()

    def _ensure_adapter(self, ref: str) -> str:
        if ref in self.loaded:
            self.loaded.move_to_end(ref)
            return self.loaded[ref]
        from peft import PeftModel

        started = time.monotonic()
        target = self.registry.materialize(self.registry.show(ref))
        name = "a" + hashlib.sha256(ref.encode()).hexdigest()[:16]
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(target), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(target), adapter_name=name)
        self.model.eval()
        self.loaded[ref] = name
        # Unloaded after the new one is in and active: a PeftModel always keeps one adapter.
        self.model.set_adapter(name)
        while len(self.loaded) > self.settings.peft_max_adapters:
            _, oldest = self.loaded.popitem(last=False)
            self.model.delete_adapter(oldest)
        self.metrics.adapter_loads.labels(ref, "peft").inc()
        self.metrics.adapter_load_latency.labels("peft").observe(time.monotonic() - started)
        return name

    def _generate(self, ref: str, path: str, items: list[_Pending]) -> list[dict[str, Any]]:
        import torch

        self._ensure_model()
        name = self._ensure_adapter(ref)  # may wrap self.model in a PeftModel: look it up after
        self.model.set_adapter(name)
        chat = path.endswith("chat/completions")
        prompts = []
        for item in items:
            if chat:
                text = render_chat(self.tokenizer, item.body["messages"], add_generation_prompt=True)
            else:
                text = (
                    item.body["prompt"]
                    if isinstance(item.body["prompt"], str)
                    else str(item.body["prompt"][0])
                )
            prompts.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        first = items[0].body
        max_new = max(
            int(i.body.get("max_tokens") or i.body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS)
            for i in items
        )
        temperature = float(first.get("temperature") if first.get("temperature") is not None else 1.0)
        sample = temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample}
        if sample:
            kwargs.update(temperature=temperature, top_p=float(first.get("top_p") or 1.0))
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                pad_token_id=pad,
                eos_token_id=self.tokenizer.eos_token_id,
                **kwargs,
            )
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(items))
        results = []
        for item, prompt, row in zip(items, prompts, out[:, width:], strict=True):
            limit = int(
                item.body.get("max_tokens") or item.body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
            )
            tokens = row.tolist()[:limit]
            finish = "length"
            if self.tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(self.tokenizer.eos_token_id)]
                finish = "stop"
            tokens = [t for t in tokens if t != pad]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            usage = {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(tokens),
                "total_tokens": len(prompt) + len(tokens),
            }
            results.append(_response(chat, ref, text, finish, usage))
        return results

    async def as_stream(self, payload: dict[str, Any]) -> AsyncIterator[bytes]:
        chat = payload["object"] == "chat.completion"
        choice = payload["choices"][0]
        base = {k: payload[k] for k in ("id", "created", "model")}
        if chat:
            obj = "chat.completion.chunk"
            first = {
                "index": 0,
                "delta": {"role": "assistant", "content": choice["message"]["content"]},
                "finish_reason": None,
            }
            last = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
        else:
            obj = "text_completion"
            first = {"index": 0, "text": choice["text"], "finish_reason": None}
            last = {"index": 0, "text": "", "finish_reason": choice["finish_reason"]}
        for c in (first, last):
            yield f"data: {json.dumps({**base, 'object': obj, 'choices': [c]})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _response(chat: bool, ref: str, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
    created = int(time.time())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created}
        return {**head, "model": ref, "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created}
    return {**head, "model": ref, "choices": [choice], "usage": usage}
