"""Load: many concurrent clients against one ``adapterdeck serve`` for a fixed time.

    .venv/bin/python bench/load.py [--clients 64] [--seconds 60] [--workdir out/bench/load]

The server (gateway + the CPU vLLM it supervises, the offline demo base, float32) serves four
tenants with 20 random LoRA adapters between them, and one A/B experiment: ``acme/t0`` split
between its versions 1 and 2 (30%), with version 3 as a shadow. Every client loops until the time
is up, each request picking a tenant, then one of its adapters by bare name, ``@N``, ``:prod``, the
experiment's public name or the base, with a random user id out of 500; one request in four
streams. Every request is bounded: ``max_tokens`` 16 and a 120 s timeout, to 127.0.0.1 only.

Reported: requests, errors by kind (HTTP status, timeout, connection), throughput, p50/p95/p99
latency (time to the last byte), and the gateway's resident memory after a warm-up (one request
per adapter, then ``--warmup`` seconds of the same load) and at the end. Goals: zero errors, and
memory growth after warm-up under 10%. The exit code is 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.registry_helpers
sys.path.insert(0, str(ROOT / "bench"))

from serving import SERVED, Server, say, start_server, wait_ready  # noqa: E402

TENANTS = {"acme": 8, "globex": 6, "initech": 4, "umbrella": 2}  # adapters per tenant (20 in all)
MAX_TOKENS = 16
TIMEOUT = 120
USERS = 500
GOAL_GROWTH = 0.10


def prepare(workdir: Path) -> tuple[Path, Path, dict[str, list[str]], dict[str, str]]:
    """Base model and adapters (cached in the workdir); a fresh registry, keys and the experiment."""
    from adapterdeck.core.basemodel import build_base_model
    from adapterdeck.registry import Registry, RegistrySettings
    from adapterdeck.registry.experiments import Experiments
    from adapterdeck.registry.tenants import create_key
    from tests.registry_helpers import claim_vllm, make_lora

    base = workdir / "base" / "tiny-llama"
    if not (base / "config.json").exists():
        say("building the demo base model")
        build_base_model(base, seed=0)
    home = workdir / "home"
    shutil.rmtree(home, ignore_errors=True)
    registry = Registry(RegistrySettings(home=home))
    models: dict[str, list[str]] = {}
    seed = 500
    for tenant, count in TENANTS.items():
        models[tenant] = [SERVED]
        for i in range(count):
            name = f"{tenant}/t{i}"
            versions = 3 if name == "acme/t0" else 1
            for _ in range(versions):
                lora = workdir / "loras" / f"seed{seed}"
                if not (lora / "adapter_model.safetensors").exists():
                    shutil.rmtree(lora, ignore_errors=True)
                    claim_vllm(make_lora(base, lora, seed=seed), base)
                registry.publish(lora, name)
                seed += 1
            registry.set_alias(name, "prod", 1)
            models[tenant] += [name, f"{name}@1", f"{name}:prod"]
    Experiments(registry).create("acme/t0", "v1", [("v2", 30)], shadow="v3")
    keys = {tenant: create_key(registry, tenant) for tenant in TENANTS}
    registry.close()
    return base, home, models, keys


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Outcome:
    latency: float
    kind: str  # "ok", "http_503", "timeout", "connection (ReadError)", ...
    stream: bool


async def request(
    client: httpx.AsyncClient, url: str, key: str, model: str, user: str, stream: bool
) -> Outcome:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi, the courier lost my parcel (order 1234)."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "user": user,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {key}"}
    started = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                done = False
                async for line in r.aiter_lines():
                    done = done or line == "data: [DONE]"
                kind = "ok" if r.status_code == 200 and done else f"http_{r.status_code}"
        else:
            r = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            kind = "ok" if r.status_code == 200 and r.json()["choices"] else f"http_{r.status_code}"
    except httpx.TimeoutException:
        kind = "timeout"
    except httpx.TransportError as exc:
        kind = f"connection ({type(exc).__name__})"
    except (json.JSONDecodeError, KeyError):
        kind = "bad_body"
    return Outcome(time.perf_counter() - started, kind, stream)


async def drive(
    url: str, keys: dict[str, str], models: dict[str, list[str]], clients: int, seconds: float, seed: int
) -> list[Outcome]:
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + seconds
    tenants = list(TENANTS)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(TIMEOUT, connect=5)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                tenant = rng.choice(tenants)
                model = "acme/t0" if tenant == "acme" and rng.random() < 0.3 else rng.choice(models[tenant])
                user = f"user-{rng.randrange(USERS)}"
                outcomes.append(await request(client, url, keys[tenant], model, user, rng.random() < 0.25))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return outcomes


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] * 1000 if values else float("nan")


def report(outcomes: list[Outcome], seconds: float, clients: int, rss: tuple[float, float]) -> None:
    kinds = Counter(o.kind for o in outcomes)
    errors = sum(n for kind, n in kinds.items() if kind != "ok")
    ok = [o.latency for o in outcomes if o.kind == "ok"]
    print()
    print(f"load: {clients} clients, {seconds:.0f} s, 20 adapters of 4 tenants, an experiment with a shadow")
    print(f"  requests      {len(outcomes):>8}   ({sum(o.stream for o in outcomes)} streamed)")
    print(f"  errors        {errors:>8}   {dict(kinds - Counter(ok=kinds['ok'])) or ''}")
    tokens = len(ok) * MAX_TOKENS / seconds
    print(f"  throughput    {len(outcomes) / seconds:>8.2f} req/s, {tokens:.0f} tokens/s (at most)")
    print(f"  latency ms    p50 {pct(ok, 0.5):.0f}   p95 {pct(ok, 0.95):.0f}   p99 {pct(ok, 0.99):.0f}")
    start, end = rss
    growth = (end - start) / start
    print(f"  gateway RSS   {start:.1f} MiB after warm-up -> {end:.1f} MiB at the end ({growth:+.1%})")
    print(f"  goal: zero errors: {'PASS' if errors == 0 else 'FAIL'}; "
          f"memory growth < {GOAL_GROWTH:.0%}: {'PASS' if growth < GOAL_GROWTH else 'FAIL'}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=15, help="seconds of load before the first RSS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench" / "load")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, home, models, keys = prepare(args.workdir)
    server: Server = start_server(base, home, args.workdir)
    say(f"server pid {server.proc.pid}, gateway {server.url}, log {server.log}")
    try:
        say(f"ready after {wait_ready(server):.0f} s; warming up")
        every = [(t, m) for t, ms in models.items() for m in ms if m != SERVED]
        asyncio.run(warm(server.url, keys, every))
        asyncio.run(drive(server.url, keys, models, args.clients, args.warmup, args.seed + 1))
        before = rss_mib(server.proc.pid)
        say(f"gateway RSS after warm-up {before:.1f} MiB; {args.clients} clients for {args.seconds:.0f} s")
        outcomes = asyncio.run(drive(server.url, keys, models, args.clients, args.seconds, args.seed))
        after = rss_mib(server.proc.pid)
    finally:
        server.stop()
    report(outcomes, args.seconds, args.clients, (before, after))
    return 0


async def warm(url: str, keys: dict[str, str], every: list[tuple[str, str]]) -> None:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        for tenant, model in every:
            outcome = await request(client, url, keys[tenant], model, "warm-up", False)
            if outcome.kind != "ok":
                say(f"warm-up: {model}: {outcome.kind}")


if __name__ == "__main__":
    sys.exit(main())
