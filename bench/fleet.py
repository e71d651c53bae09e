"""Fleet: adapter-affinity routing vs round-robin vs least-loaded over two vLLM replicas, then a
replica killed under load.

    .venv/bin/python bench/fleet.py [--base tiny|smollm2-135m-instruct] [--requests 300]
                                    [--warmup 300] [--adapters 1000]
                                    [--working-set 200] [--cpu-loras 100] [--rounds 2]
                                    [--clients 8] [--fleet KEY=VALUE] [--compare KEY=VALUE]
                                    [--no-failover] [--quick] [--workdir DIR]

A fresh registry holds ``--adapters`` published adapters (one random LoRA published once, then
``tests/registry_helpers.bulk_fill``: each adapter its own manifest, so its own cache directory and
its own load in vLLM). Two CPU vLLM replicas of the offline base (float32; ``--base``: the tiny demo
base, whose LoRA r 8 on every linear layer is 200 KB, or the real SmolLM2-135M-Instruct, whose LoRA
of the same shape is 19 MB, so that a cold load costs what real adapters cost), each on its share
of the cores and with few LoRA slots (``vllm.max_loras`` 2 adapters per batch, ``vllm.max_cpu_loras``
``--cpu-loras`` kept loaded: by default half the working set, so the fleet as a whole can keep the
working set loaded but one replica cannot), are started once with the command ``adapterdeck
serve`` gives them; three gateways share them (``--vllm-url`` twice), one per ``fleet.policy``:
``affinity`` (the fleet's router, with ``--fleet`` settings), ``round_robin`` and ``least_loaded``
(baselines), and with ``--compare`` a fourth, ``affinity-b``: the router with other settings. Every request
streams a chat completion (``max_tokens`` 16, ``ignore_eos``) to an adapter drawn from
``--working-set`` of them with Zipf(1.0) popularity.

(a) Routing, in ``--rounds`` rounds of one block per policy (rotated each round; every block of a
    round sends the same ``--requests`` requests from ``--clients`` workers). Each block measures
    the steady state of a fleet that has been serving its working set for a while under that
    policy: first 2 x ``max_cpu_loras`` adapters outside the working set go through the round-robin
    gateway (so nothing the previous block loaded helps this one), then, through the block's own
    gateway and not counted, every adapter of the working set once (in random order) and
    ``--warmup`` requests of the same Zipf popularity; then the counted requests. Reported per
    policy: throughput (requests/s), adapter loads per 1,000 requests (the gateway's
    ``adapterdeck_replica_adapter_loads`` counters: requests that sent an adapter to a replica that
    did not hold it, as far as that gateway knows) and p50/p95 time to first token. Goals:
    affinity >= 1.3x round-robin throughput and <= 0.3x its loads per 1,000.
(b) Failover: those servers are stopped and one ``adapterdeck serve --replicas 2`` (affinity)
    started; under the same load, one replica's process group is killed (SIGKILL) a third of the
    way in, and the load goes on until it has restarted and served for a while. Reported: client
    errors of requests that had not streamed anything yet (goal 0) and of those that had, the time
    from the kill to the first token the other replica sent for an adapter the dead one had served
    (goal <= 1 s), and the dead replica's share of requests before the kill and after its restart.

Every process started is stopped at the end (SIGTERM, then SIGKILL of its process group), even on
error. The exit code is 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.registry_helpers
sys.path.insert(0, str(ROOT / "bench"))

from serving import SERVED, free_port, say  # noqa: E402

TENANT = "fleet"
POLICIES = ("affinity", "round_robin", "least_loaded")
BASES = ("tiny", "smollm2-135m-instruct")
MAX_LORAS, MAX_CPU_LORAS = 2, 100
MAX_TOKENS = 16
TIMEOUT = 120
GOAL_THROUGHPUT, GOAL_LOADS, GOAL_TAKEOVER = 1.3, 0.3, 1.0
LOADS = re.compile(r"^adapterdeck_replica_adapter_loads_total\{[^}]*\}\s+(\S+)", re.M)
REPLICA_HEADER = "x-adapterdeck-replica"


# --- preparation -------------------------------------------------------------------------------


def prepare(workdir: Path, adapters: int, base_name: str) -> tuple[Path, Path, list[str], str, str]:
    """Base model (``tiny`` or an offline packaged one, by name) and one LoRA on it (both cached in
    the workdir); a fresh registry with ``adapters`` published adapters; a tenant key and an admin
    key (for ``/metrics``)."""
    from adapterdeck.core.basemodel import ensure_named_base
    from adapterdeck.registry import Registry, RegistrySettings
    from adapterdeck.registry.tenants import create_key
    from tests.registry_helpers import bulk_fill, claim_vllm, make_lora

    base = workdir / "base" / base_name
    if not (base / "config.json").exists():
        say(f"building the base model {base_name}")
    if base_name != "tiny" or not (base / "config.json").exists():
        ensure_named_base(base_name, base)  # a packaged base: rebuilt only if its source changed
    lora = workdir / "loras" / f"{base_name}-seed7"
    if not (lora / "adapter_model.safetensors").exists():
        shutil.rmtree(lora, ignore_errors=True)
        claim_vllm(make_lora(base, lora, seed=7), base)
    home = workdir / "home"
    shutil.rmtree(home, ignore_errors=True)
    registry = Registry(RegistrySettings(home=home))
    registry.publish(lora, f"{TENANT}/template")
    names = [f"{TENANT}/a{i:05d}" for i in range(adapters)]
    started = time.monotonic()
    bulk_fill(registry, names, 1, f"{TENANT}/template@1")
    say(f"published {adapters} adapters in {time.monotonic() - started:.1f} s")
    key, admin = create_key(registry, TENANT), create_key(registry, None)
    registry.close()
    return base, home, [f"{n}@1" for n in names], key, admin


def zipf_requests(working: list[str], count: int, seed: int) -> list[str]:
    """``count`` adapters out of ``working``, the i-th (from 1) with weight 1/i: Zipf(1.0)."""
    rng = random.Random(seed)
    return rng.choices(working, weights=[1 / (i + 1) for i in range(len(working))], k=count)


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    url: str

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within 60 s: SIGKILL")
        killpg(self.popen.pid, signal.SIGKILL)  # whatever is left of its group
        self.popen.wait()


def killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


AFFINITY: dict[str, str] = {}  # --fleet KEY=VALUE: fleet settings of the affinity gateway
COMPARED: dict[str, str] = {}  # --compare KEY=VALUE: a second affinity gateway, "affinity-b"
# Each gateway of the routing part: its name -> (fleet.policy, its other fleet settings).
GATEWAYS: dict[str, tuple[str, dict[str, str]]] = {
    p: (p, AFFINITY if p == "affinity" else {}) for p in POLICIES
}


def settings_yaml(gateway: str) -> str:
    policy, extra = GATEWAYS[gateway]
    bound = "".join(f", {k}: {v}" for k, v in extra.items())
    return (
        f"vllm: {{max_loras: {MAX_LORAS}, max_cpu_loras: {MAX_CPU_LORAS}, nice: 0}}\n"
        f"fleet: {{policy: {policy}{bound}}}\n"
    )


def start_vllms(base: Path, home: Path, workdir: Path, key: str) -> list[Proc]:
    """Two vLLM servers with the command and placement ``adapterdeck serve --replicas 2`` gives
    them, but one fixed API key, so several gateways can share them."""
    from adapterdeck.registry import RegistrySettings
    from adapterdeck.serve.engines.process import VllmSupervisor, placement_env
    from adapterdeck.serve.settings import ServeSettings

    settings = ServeSettings.model_validate(
        {
            "base": str(base),
            "served_name": SERVED,
            "vllm": {"max_loras": MAX_LORAS, "max_cpu_loras": MAX_CPU_LORAS, "dtype": "float32",
                     "max_model_len": 512, "nice": 0},
        }
    )  # fmt: skip
    child = RegistrySettings(home=home).child_env()
    cpus = sorted(os.sched_getaffinity(0))
    procs = []
    for i in range(2):
        port = free_port()
        supervisor = VllmSupervisor(settings, {}, workdir / f"vllm-{i}.log", port)
        env = {
            **os.environ, **child, **placement_env(i, 2, cpus, []),
            "VLLM_API_KEY": key, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
        }  # fmt: skip
        with (workdir / f"vllm-{i}.log").open("w") as log:
            popen = subprocess.Popen(
                supervisor.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        procs.append(Proc(f"vllm-{i}", popen, supervisor.url))
    return procs


def start_gateway(
    base: Path, home: Path, workdir: Path, name: str, config: str, extra: list[str], env: dict[str, str]
) -> Proc:
    port = free_port()
    (workdir / f"{name}.yaml").write_text(config)
    cmd = [
        sys.executable, "-m", "adapterdeck.core.cli", "serve", "--base", str(base),
        "--port", str(port), "--max-model-len", "512", "--dtype", "float32",
        "--served-name", SERVED, "--config", str(workdir / f"{name}.yaml"), "--workers", "0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "ADAPTERDECK_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1", **env}
    with (workdir / f"{name}.log").open("w") as log:
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Proc(name, popen, f"http://127.0.0.1:{port}")


def wait_until(check, what: str, procs: list[Proc], timeout: float = 600) -> float:
    started = time.monotonic()
    while time.monotonic() < started + timeout:
        for p in procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode} while waiting for {what}")
        try:
            if check():
                return time.monotonic() - started
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what}: not within {timeout} s")


ADMIN: dict[str, str] = {}  # the Authorization header of an admin key: /health in full, /metrics


def replicas_ready(url: str) -> list[dict]:
    report = httpx.get(f"{url}/health", headers=ADMIN, timeout=5).json()["engines"]["vllm"]
    return [r for r in report.get("replicas", [report]) if r.get("status") == "ready"]


def loads(url: str, admin: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=ADMIN, timeout=10).text
    return sum(float(v) for v in LOADS.findall(text))


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (seconds) in milliseconds."""
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] * 1000 if values else float("nan")


def answers(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=2).status_code == 200


# --- load --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    model: str
    start: float
    first: float | None  # when the first content arrived (monotonic)
    end: float
    kind: str  # "ok", "http_503", "connection (ReadError)", ...
    replica: str | None
    status: int | None = None  # None: the response had not begun (no status line) when it failed


async def request(client: httpx.AsyncClient, url: str, key: str, model: str) -> Outcome:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi, the courier lost my parcel (order 1234)."}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
    }  # fmt: skip
    start, first, replica, status = time.monotonic(), None, None, None
    try:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            replica, status = r.headers.get(REPLICA_HEADER), r.status_code
            done = False
            async for line in r.aiter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.monotonic()
                done = done or line == "data: [DONE]"
            kind = "ok" if r.status_code == 200 and done else f"http_{r.status_code}"
    except httpx.TimeoutException:
        kind = "timeout"
    except httpx.TransportError as exc:
        kind = f"connection ({type(exc).__name__})"
    return Outcome(model, start, first, time.monotonic(), kind, replica, status)


async def drive(
    url: str, key: str, models: list[str], clients: int, until: float | None = None
) -> list[Outcome]:
    """Send ``models`` (one request each, in order) from ``clients`` workers; with ``until`` (a
    monotonic time), loop over them until then instead."""
    outcomes: list[Outcome] = []
    turn = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(TIMEOUT, connect=5), limits=limits) as client:

        async def worker() -> None:
            nonlocal turn
            while (turn < len(models)) if until is None else (time.monotonic() < until):
                model = models[turn % len(models)]
                turn += 1
                outcomes.append(await request(client, url, key, model))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return outcomes


# --- (a) routing -------------------------------------------------------------------------------


@dataclass
class Block:
    requests: int
    seconds: float
    loads: float
    ttft: list[float]
    errors: int
    away: float  # share of the answered requests served off the adapter's first rendezvous replica


def away_share(outcomes: list[Outcome], urls: list[str]) -> float:
    """How many answered requests went to a replica other than their adapter's first choice in
    rendezvous order (replica ids are the positions of ``urls``): spread, overflow or failover."""
    from adapterdeck.serve.fleet.router import score

    answered = [o for o in outcomes if o.replica is not None]
    home = {
        m: max(range(len(urls)), key=lambda i: (score(m, urls[i]), urls[i]))
        for m in {o.model for o in answered}
    }
    return sum(o.replica != str(home[o.model]) for o in answered) / max(1, len(answered))


def routing(
    args: argparse.Namespace, base: Path, home: Path, names: list[str], key: str, admin: str
) -> dict[str, list[Block]]:
    vllm_key = "fleet-bench-vllm-key"
    rng = random.Random(args.seed)
    picked = rng.sample(names, args.working_set)
    working, outside = picked, [n for n in names if n not in set(picked)]
    procs = start_vllms(base, home, args.workdir, vllm_key)
    names_ = list(GATEWAYS)
    blocks: dict[str, list[Block]] = {g: [] for g in names_}
    try:
        say("starting 2 vLLM replicas")
        for p in procs:
            took = wait_until(lambda p=p: answers(p.url), f"{p.name} ready", procs)
            say(f"{p.name} at {p.url} ready after {took:.0f} s")
        urls = [arg for p in procs[:2] for arg in ("--vllm-url", p.url)]
        gateways = {
            policy: start_gateway(base, home, args.workdir, f"gateway-{policy}", settings_yaml(policy), urls,
                                  {"ADAPTERDECK_VLLM_API_KEY": vllm_key})
            for policy in names_
        }  # fmt: skip
        procs += gateways.values()
        for policy, g in gateways.items():
            wait_until(lambda g=g: len(replicas_ready(g.url)) == 2, f"gateway {policy}", procs, timeout=180)
        say(f"gateways ready: {', '.join(f'{p} {g.url}' for p, g in gateways.items())}")
        flush_at = 0
        for rnd in range(args.rounds):
            models = zipf_requests(working, args.requests, args.seed + rnd)
            order = names_[rnd % len(names_) :] + names_[: rnd % len(names_)]
            for policy in order:
                flush = outside[flush_at : flush_at + 2 * MAX_CPU_LORAS]
                flush_at += len(flush)
                asyncio.run(drive(gateways["round_robin"].url, key, flush, 2))
                url = gateways[policy].url
                seed = rng.randrange(2**31)
                warm = rng.sample(working, len(working)) + zipf_requests(working, args.warmup, seed)
                asyncio.run(drive(url, key, warm, args.clients))
                before = loads(url, admin)
                started = time.monotonic()
                outcomes = asyncio.run(drive(url, key, models, args.clients))
                seconds = time.monotonic() - started
                ok = [o for o in outcomes if o.kind == "ok"]
                block = Block(
                    len(outcomes), seconds, loads(url, admin) - before,
                    [o.first - o.start for o in ok if o.first is not None], len(outcomes) - len(ok),
                    away_share(ok, [p.url for p in procs[:2]]),
                )  # fmt: skip
                blocks[policy].append(block)
                say(
                    f"round {rnd + 1} {policy:>12}: {block.requests / seconds:6.2f} req/s, "
                    f"{1000 * block.loads / block.requests:5.0f} loads/1000, "
                    f"TTFT p50 {pct(block.ttft, 0.5):.0f} ms, {block.errors} errors, "
                    f"{100 * block.away:.0f}% off the first replica"
                )
    finally:
        for p in reversed(procs):
            p.stop()
    return blocks


# --- (b) failover ------------------------------------------------------------------------------


@dataclass
class Failover:
    outcomes: list[Outcome]
    killed: float
    back: float
    dead: str


def failover(args: argparse.Namespace, base: Path, home: Path, names: list[str], key: str) -> Failover:
    working = random.Random(args.seed).sample(names, args.working_set)
    server = start_gateway(
        base,
        home,
        args.workdir,
        "serve-replicas",
        settings_yaml("affinity"),
        ["--replicas", "2", "--vllm-port", str(free_port())],
        {},
    )
    try:
        say("starting adapterdeck serve --replicas 2")
        took = wait_until(lambda: len(replicas_ready(server.url)) == 2, "serve --replicas 2", [server])
        say(f"ready after {took:.0f} s")
        models = zipf_requests(working, 10_000, args.seed + 99)
        asyncio.run(drive(server.url, key, models[: args.requests // 2], args.clients))  # warm-up
        state: dict[str, float] = {}
        outcomes = asyncio.run(under_kill(server.url, key, models, args, state, replicas_ready))
        return Failover(outcomes, state["killed"], state["back"], state["dead"])
    finally:
        server.stop()


async def under_kill(
    url: str, key: str, models: list[str], args: argparse.Namespace, state: dict, ready
) -> list[Outcome]:
    """The load, with the kill and the restart watched beside it."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    turn = 0
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(TIMEOUT, connect=5), limits=limits) as client:

        async def worker() -> None:
            nonlocal turn
            while not stop.is_set():
                model = models[turn % len(models)]
                turn += 1
                outcomes.append(await request(client, url, key, model))

        async def watch() -> None:
            await asyncio.sleep(args.before_kill)
            victim = (await asyncio.to_thread(ready, url))[1]
            state["dead"] = victim["id"]
            killpg(victim["pid"], signal.SIGKILL)
            state["killed"] = time.monotonic()
            say(f"killed replica {victim['id']} (process group {victim['pid']})")
            await asyncio.sleep(2)
            while len(await asyncio.to_thread(ready, url)) < 2:
                await asyncio.sleep(0.5)
            state["back"] = time.monotonic()
            say(f"replica {victim['id']} back after {state['back'] - state['killed']:.0f} s")
            await asyncio.sleep(args.after_back)
            stop.set()

        await asyncio.gather(watch(), *(worker() for _ in range(args.clients)))
    return outcomes


# --- report ------------------------------------------------------------------------------------


def report(args: argparse.Namespace, blocks: dict[str, list[Block]], fo: Failover | None) -> None:
    print()
    print(
        f"fleet: 2 vLLM replicas of {args.base} (CPU, max_loras {MAX_LORAS}, max_cpu_loras {MAX_CPU_LORAS}), "
        f"{args.adapters} adapters, Zipf(1.0) over {args.working_set}, {args.rounds} rounds x "
        f"{args.requests} streamed requests per policy after {args.working_set} + {args.warmup} warm-up, "
        f"{args.clients} clients"
    )
    if AFFINITY:
        print(f"  affinity gateway's fleet settings: {', '.join(f'{k}={v}' for k, v in AFFINITY.items())}")
    if COMPARED:
        print(f"  affinity-b gateway's fleet settings: {', '.join(f'{k}={v}' for k, v in COMPARED.items())}")
    figures = {}
    print(f"  {'policy':>12}  {'req/s':>7}  {'loads/1000':>10}  {'TTFT p50 ms':>11}  {'p95 ms':>7}  errors")
    for policy, bs in blocks.items():
        n = sum(b.requests for b in bs)
        rate = n / sum(b.seconds for b in bs)
        per = 1000 * sum(b.loads for b in bs) / n
        ttft = [t for b in bs for t in b.ttft]
        figures[policy] = (rate, per)
        print(
            f"  {policy:>12}  {rate:7.2f}  {per:10.0f}  {pct(ttft, 0.5):11.0f}  "
            f"{pct(ttft, 0.95):7.0f}  {sum(b.errors for b in bs)}"
        )
    (a_rate, a_per), (r_rate, r_per) = figures["affinity"], figures["round_robin"]
    speed, fewer = a_rate / r_rate, (a_per / r_per if r_per else float("nan"))
    print(f"  affinity / round-robin throughput {speed:.2f}x (goal >= {GOAL_THROUGHPUT}x): "
          f"{'PASS' if speed >= GOAL_THROUGHPUT else 'FAIL'}")  # fmt: skip
    print(f"  affinity / round-robin loads per 1,000 {fewer:.2f}x (goal <= {GOAL_LOADS}x): "
          f"{'PASS' if fewer <= GOAL_LOADS else 'FAIL'}")  # fmt: skip
    print(f"  affinity / least-loaded throughput {a_rate / figures['least_loaded'][0]:.2f}x")
    if "affinity-b" in figures:
        b_rate, b_per = figures["affinity-b"]
        print(f"  affinity-b / round-robin throughput {b_rate / r_rate:.2f}x, loads per 1,000 "
              f"{b_per / r_per if r_per else float('nan'):.2f}x")  # fmt: skip
    if fo is not None:
        failover_report(fo)


def failover_report(fo: Failover) -> None:
    """Errors by how far the response had got; the takeover: from the kill to the first token, on
    the other replica, of a request sent after the kill to an adapter that only the dead replica
    had answered in the 5 s before it; the dead replica's share before and after."""
    out = fo.outcomes
    failed = [o for o in out if o.kind != "ok"]
    unbegun = [o for o in failed if o.status is None]
    headers_only = [o for o in failed if o.status is not None and o.first is None]
    before = [o for o in out if o.end < fo.killed and o.kind == "ok"]
    recent = [o for o in before if o.end > fo.killed - 5]
    home = {o.model for o in recent if o.replica == fo.dead} - {
        o.model for o in recent if o.replica != fo.dead
    }
    taken = [
        o.first for o in out
        if o.model in home and o.start > fo.killed and o.first is not None and o.replica != fo.dead
    ]  # fmt: skip
    takeover = min(taken) - fo.killed if taken else float("nan")
    stalled = [
        o.first - fo.killed for o in out if o.start <= fo.killed < o.end and o.first and o.first > fo.killed
    ]
    after = [o for o in out if o.start > fo.back and o.kind == "ok"]

    def share(os: list[Outcome]) -> float:
        return sum(o.replica == fo.dead for o in os) / len(os) if os else float("nan")

    print(
        f"  failover: {len(out)} requests; replica {fo.dead} killed, back {fo.back - fo.killed:.0f} s later"
    )
    print(f"    errors before the response began {len(unbegun)} (goal 0): {'PASS' if not unbegun else 'FAIL'}"
          f"   {dict(Counter(o.kind for o in unbegun)) or ''}")  # fmt: skip
    print(f"    errors after the status line but before any token {len(headers_only)}, "
          f"after tokens had streamed {len(failed) - len(unbegun) - len(headers_only)}")  # fmt: skip
    print(f"    first token on the other replica for the dead one's adapters {takeover:.2f} s after the "
          f"kill (goal <= {GOAL_TAKEOVER} s): {'PASS' if takeover <= GOAL_TAKEOVER else 'FAIL'}"
          f"; in-flight requests' first token up to {max(stalled, default=0):.2f} s after it")  # fmt: skip
    print(f"    its share of requests: {share(before):.0%} before the kill, {share(after):.0%} after "
          f"its restart: {'PASS' if share(after) > 0 else 'FAIL'}")  # fmt: skip


def main() -> int:
    global MAX_CPU_LORAS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per policy per round")
    parser.add_argument(
        "--warmup", type=int, default=300, help="uncounted requests per block before the counted ones"
    )
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument(
        "--base", default="tiny", choices=BASES,
        help="the served base: tiny (a LoRA of 200 KB) or the real smollm2-135m-instruct (19 MB)",
    )  # fmt: skip
    parser.add_argument("--working-set", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--before-kill", type=float, default=20, help="seconds of failover load before the kill"
    )
    parser.add_argument("--after-back", type=float, default=20, help="... and after the restart")
    parser.add_argument(
        "--cpu-loras", type=int, default=MAX_CPU_LORAS, help="vllm.max_cpu_loras: adapters each replica keeps"
    )
    parser.add_argument(
        "--fleet", action="append", default=[], metavar="KEY=VALUE",
        help="a fleet setting of the affinity gateway (e.g. load_factor=0.5); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--compare", action="append", default=[], metavar="KEY=VALUE",
        help="adds a second affinity gateway (affinity-b) with this fleet setting; repeatable",
    )  # fmt: skip
    parser.add_argument("--no-failover", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a short run: does it work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench" / "fleet")
    args = parser.parse_args()
    MAX_CPU_LORAS = args.cpu_loras
    AFFINITY.update(item.split("=", 1) for item in args.fleet)
    if args.compare:
        COMPARED.update(item.split("=", 1) for item in args.compare)
        GATEWAYS["affinity-b"] = ("affinity", COMPARED)
    if args.quick:
        args.requests, args.warmup, args.rounds, args.before_kill, args.after_back = 40, 20, 1, 8, 8
        args.working_set, MAX_CPU_LORAS = min(args.working_set, 40), min(MAX_CPU_LORAS, 20)
    args.workdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the servers are stopped on the way out
    base, home, names, key, admin = prepare(args.workdir, args.adapters, args.base)
    ADMIN["Authorization"] = f"Bearer {admin}"
    blocks = routing(args, base, home, names, key, admin)
    fo = None if args.no_failover else failover(args, base, home, names, key)
    if fo is not None:
        dump = [vars(o) | {"t": o.start - fo.killed} for o in fo.outcomes]
        (args.workdir / "failover.json").write_text(
            json.dumps({"dead": fo.dead, "back": fo.back - fo.killed, "outcomes": dump})
        )
    report(args, blocks, fo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
