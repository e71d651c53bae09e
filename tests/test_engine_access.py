"""Only the gateway reaches the vLLM engine it starts, and tenants share no prefix cache (issue 13).

A real ``adapterdeck serve`` that starts and supervises a real vLLM (CPU build) on the tiny base,
with a tenant's adapter in a real registry; vLLM is called directly, as anything else on the
machine could, and through the gateway.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.tenants import create_key

from .conftest import free_port
from .gateway_helpers import health_ok, launch, start_gateway, wait_ready
from .registry_helpers import make_lora

pytestmark = pytest.mark.vllm


@dataclass
class Serving:
    url: str
    vllm_url: str
    vllm_pid: int
    base: Path
    home: Path
    keys: dict[str, str]
    work: Path
    log: Path

    def http(self, who: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.keys[who]}"}, timeout=120
        )

    def engine_key(self) -> str:
        """What anything running as the gateway's user could read: vLLM's environment."""
        environ = Path(f"/proc/{self.vllm_pid}/environ").read_bytes().split(b"\0")
        return next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"VLLM_API_KEY="))


@pytest.fixture(scope="module")
def serving(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    work = tmp_path_factory.mktemp("engine-access")
    home = work / "home"
    registry = Registry(RegistrySettings(home=home))
    for tenant, seed in (("acme", 1), ("globex", 2)):
        registry.publish(make_lora(base_model, work / f"lora-{tenant}", seed=seed), f"{tenant}/random")
    keys = {"acme": create_key(registry, "acme"), "globex": create_key(registry, "globex")}
    keys["admin"] = create_key(registry, None)
    registry.close()
    port, vllm_port = free_port(), free_port()
    config = work / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "vllm": {
                    "max_loras": 2,
                    "max_cpu_loras": 4,
                    "max_lora_rank": 16,
                    # usage.prompt_tokens_details.cached_tokens: the prefix cache's hits, exactly
                    "extra_args": ["--enforce-eager", "--enable-prompt-tokens-details"],
                }
            }
        )
    )
    args = [
        "--base", base_model, "--port", str(port), "--vllm-port", str(vllm_port), "--max-model-len", "512",
        "--served-name", "tiny", "--dtype", "float32", "--workers", "0", "--config", config,
    ]  # fmt: skip
    env = {"ADAPTERDECK_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    process = launch("serve", args, env, work / "serve.log")
    url = f"http://127.0.0.1:{port}"
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    try:
        wait_ready(process, url, health_ok, timeout=600, interval=1, request_timeout=5)
        vllm = httpx.get(f"{url}/health", headers=admin, timeout=10).json()["engines"]["vllm"]
        yield Serving(url, vllm["url"], vllm["pid"], base_model, home, keys, work, process.log)
    finally:
        process.stop(timeout=60)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_only_the_gateway_reaches_the_engine(serving: Serving) -> None:
    # The gateway is let through, for the base and for adapters (which vLLM loads and caches).
    for who, model in (("acme", "acme/random"), ("globex", "globex/random"), ("acme", "tiny")):
        with serving.http(who) as http:
            reply = http.post("/v1/chat/completions", json={**CHAT, "model": model})
        assert reply.status_code == 200, reply.text
    vllm = httpx.Client(base_url=serving.vllm_url, timeout=30)
    assert vllm.get("/health").status_code == 200  # the supervisor's readiness check, nothing else
    # Without the key, nothing: not the OpenAI routes (vLLM's own --api-key covers /v1) nor the
    # ones outside /v1 that vLLM's key leaves open.
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/invocations", CHAT),
        ("POST", "/tokenize", {"model": "tiny", "prompt": "hi"}),
        ("GET", "/metrics", None),
        ("POST", "/pause", None),
        ("POST", "/reset_prefix_cache", None),
    ]:
        reply = vllm.request(method, path, json=body)
        assert reply.status_code == 401, (path, reply.status_code, reply.text)
    # Runtime loading is refused whoever asks, with the key too: the resolver alone loads adapters,
    # and only registry refs. Here: an attempt to serve acme's weights under globex's name.
    key = serving.engine_key()
    authorized = {"Authorization": f"Bearer {key}"}
    cached = next((serving.home / "cache" / "adapters").iterdir())  # acme's or globex's weights
    poison = {"lora_name": "globex/random@1", "lora_path": str(cached)}
    for headers in ({}, authorized):
        assert vllm.post("/v1/load_lora_adapter", json=poison, headers=headers).status_code == 403
        assert vllm.post("/v1/unload_lora_adapter", json=poison, headers=headers).status_code == 403
        sagemaker = {"name": "globex/random@1", "src": str(cached)}
        assert vllm.post("/adapters", json=sagemaker, headers=headers).status_code == 403
        assert vllm.delete("/adapters/globex%2Frandom@1", headers=headers).status_code == 403
    # The key is in vLLM's environment (readable by its user only), never on its command line.
    assert key.encode() not in Path(f"/proc/{serving.vllm_pid}/cmdline").read_bytes()
    assert vllm.get("/v1/models", headers=authorized).status_code == 200
    vllm.close()


def test_a_vllm_at_vllm_url_is_called_with_its_key(serving: Serving) -> None:
    env = {"ADAPTERDECK_HOME": str(serving.home)}
    ready = lambda reply: reply.status_code == 200  # noqa: E731
    keyed = start_gateway(
        serving.base, serving.vllm_url, env, serving.work, {"vllm": {"api_key": serving.engine_key()}},
        served_name="tiny", ready=ready,
    )  # fmt: skip
    keyless = start_gateway(
        serving.base, serving.vllm_url, env, serving.work, served_name="tiny", ready=ready
    )
    try:
        headers = {"Authorization": f"Bearer {serving.keys['acme']}"}
        body = {**CHAT, "model": "acme/random"}
        reply = httpx.post(f"{keyed.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert reply.status_code == 200, reply.text
        refused = httpx.post(f"{keyless.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert refused.status_code == 502, refused.text
        assert refused.json()["error"]["code"] == "engine_unauthorized"
        assert "refused the gateway's API key: set vllm.api_key" in keyless.log.read_text()
    finally:
        keyed.stop()
        keyless.stop()


def test_tenants_share_no_prefix_cache(serving: Serving) -> None:
    prompt = " ".join(f"word{i} is followed by word{i + 1}." for i in range(25))

    def cached_tokens(who: str) -> tuple[int, int, float]:
        with serving.http(who) as http:
            started = time.perf_counter()
            reply = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
            elapsed = time.perf_counter() - started
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        return (
            (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
            usage["prompt_tokens"],
            elapsed,
        )

    first, total, cold = cached_tokens("acme")
    assert 150 < total < 500
    again, _, warm = cached_tokens("acme")
    other, _, foreign = cached_tokens("globex")
    print(
        f"\nprefix cache, a {total}-token prompt: acme cold {first} cached ({cold * 1000:.0f} ms), "
        f"acme again {again} cached ({warm * 1000:.0f} ms), globex {other} cached ({foreign * 1000:.0f} ms)"
    )
    assert again > 0  # the cache works within a tenant
    assert other == 0  # and another tenant's identical prompt gets nothing from it
