"""ASGI middleware for the vLLM server the gateway starts (``--middleware
adapterdeck.serve.engines.guard.EngineGuard``): only the gateway may reach the engine.

vLLM's own ``--api-key`` (``VLLM_API_KEY``) guards only paths under ``/v1``, ``/v2``,
``/inference`` and ``/cohere``. vLLM 0.32 serves more than that: ``/invocations`` (a chat or
completion, SageMaker's name for it), ``POST /adapters`` and ``DELETE /adapters/{name}`` (SageMaker's
runtime LoRA loading: any name, any directory), ``/tokenize``, ``/pause``,
``/reset_prefix_cache``, ``/metrics`` (and ``/sleep``, ``/collective_rpc`` in dev mode), all open
without the key. This middleware, outermost in vLLM's
app, requires the key (``VLLM_API_KEY``) on every path but ``GET /health`` (the supervisor's
readiness check), and refuses every runtime-loading route, with or without the key: an adapter is
loaded only by adapterdeck's resolver, which serves immutable registry refs (``tenant/name@N``)
and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Any

# vLLM's and SageMaker's runtime LoRA loading routes: never served, whoever asks.
LOADING_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters")


class EngineGuard:
    def __init__(self, app: Any) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        if not key:
            raise RuntimeError("adapterdeck's engine guard needs VLLM_API_KEY: the key the gateway sends")
        self._digest = hashlib.sha256(key.encode()).digest()

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                digest = hashlib.sha256(token.strip().encode()).digest()
                return scheme.lower() == "bearer" and secrets.compare_digest(digest, self._digest)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if scope["type"] == "http" and path == "/health" and scope.get("method") == "GET":
            await self.app(scope, receive, send)
            return
        if any(path == p or path.startswith(p + "/") for p in LOADING_PATHS):
            await _refuse(scope, send, 403, "adapters are loaded only by adapterdeck's resolver")
            return
        if not self._authorized(scope):
            await _refuse(scope, send, 401, "only the adapterdeck gateway may call this engine")
            return
        await self.app(scope, receive, send)


async def _refuse(scope: dict[str, Any], send: Any, status: int, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"error": {"message": message, "type": "permission_error", "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
