"""Serving: gateway overhead, multi-adapter throughput and cold-adapter latency, on one vLLM.

    .venv/bin/python bench/serving.py [--requests 192] [--pairs 6] [--vllm-nice N] [--workdir DIR]

One ``adapterdeck serve`` (a subprocess, which starts and supervises the CPU vLLM) serves the
offline demo base and 32 + ``--cold`` random LoRA adapters (``make_lora``, distinct seeds, no
training) published to a fresh registry before the server starts. Every request is a chat
completion, temperature 0, ``max_tokens`` 16 with ``ignore_eos`` (so every answer is 16 tokens and
the sides do the same work), sent with one ``httpx.AsyncClient`` from N concurrent workers.

(a) Gateway vs direct vLLM (the base model, same requests) at concurrency 1, 8 and 32. The two
    sides run in ``--pairs`` blocks each, interleaved G D, D G, G D ..., and the ratio is the median
    over the pairs, so both sides of a pair share the machine's noise. Goal: gateway throughput
    >= 0.95x direct. The gateway process's CPU time per request is read from /proc.
(c) First-request latency of a never-loaded adapter (resolver copies it from the blob store, vLLM
    loads it) vs the same adapter once loaded, through the gateway, one request at a time.
(b) Throughput (through the gateway, fixed concurrency) with 1, 8 and 32 distinct adapters in the
    request mix vs the base only, after one warm-up request per adapter, in ``--pairs`` rounds
    (forward, then reverse order); the ratio is the median over the rounds of each round's ratio to
    its own base block. Goal: >= 0.7x base. The server runs with its default settings (max_loras
    8, max_cpu_loras 32, vllm.nice 5; ``--vllm-nice`` overrides the last).

Then a small in-process breakdown of what the gateway does per request besides proxying: the API
key lookup and the registry resolve (each a database query in a worker thread), and the JSON
decode/re-encode of the response. The server is stopped (SIGTERM, wait) at the end, even on error.
The exit code is 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.registry_helpers

TENANT = "bench"
SERVED = "tiny"
ADAPTERS = 32
MAX_TOKENS = 16
GOAL_GATEWAY = 0.95
GOAL_ADAPTERS = 0.7
PROMPTS = [
    "Hi, this is Tom. The courier lost my tablet (order 1234). No rush at all.",
    "Hi, this is Nora. I was charged twice for the kettle (order 5521). This is urgent.",
    "Hi, this is Ben. My password reset fails for the router (order 8812). Thanks.",
    "The blender is excellent and it works great. Bought by Omar in 2024.",
    "The jacket broke in a week but it is lovely. Bought by Sara in 2021.",
    "Hi, this is Ivan. Tracking shows no movement for the desk lamp (order 7777). Not urgent.",
    "The router is terrible and it stopped working. Bought by Lena in 2020.",
    "The kettle arrived quickly and it is well made. Bought by Priya in 2026.",
]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- preparation -------------------------------------------------------------------------------


def prepare(workdir: Path, cold: int) -> tuple[Path, Path, list[str], list[str], str]:
    """Base model and adapters (cached in the workdir), a fresh registry with them published."""
    from adapterdeck.core.basemodel import build_base_model
    from adapterdeck.registry import Registry, RegistrySettings
    from adapterdeck.registry.tenants import create_key
    from tests.registry_helpers import make_lora

    base = workdir / "base" / "tiny-llama"
    if not (base / "config.json").exists():
        say("building the demo base model")
        build_base_model(base, seed=0)
    names = [f"{TENANT}/a{i:02d}" for i in range(ADAPTERS)]
    cold_names = [f"{TENANT}/cold{i:02d}" for i in range(cold)]
    home = workdir / "home"
    shutil.rmtree(home, ignore_errors=True)
    registry = Registry(RegistrySettings(home=home))
    t0 = time.monotonic()
    for seed, name in enumerate(names + cold_names, start=100):
        lora = workdir / "loras" / f"seed{seed}"
        if not (lora / "adapter_model.safetensors").exists():
            shutil.rmtree(lora, ignore_errors=True)
            make_lora(base, lora, seed=seed)
        registry.publish(lora, name)
    say(f"published {len(names) + len(cold_names)} adapters in {time.monotonic() - t0:.1f} s")
    key = create_key(registry, TENANT)
    registry.engine.dispose()
    return base, home, names, cold_names, key


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    vllm_url: str
    log: Path
    vllm_pid: int | None = None

    def stop(self) -> None:
        if self.proc.poll() is None:
            say("stopping the server (SIGTERM)")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                say("server did not stop within 60 s: SIGKILL")
                _killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.vllm_pid is not None and _alive(self.vllm_pid):
            say(f"vLLM (pid {self.vllm_pid}) outlived the gateway: SIGKILL")
            _killpg(self.vllm_pid, signal.SIGKILL)
        say(f"server exited with {self.proc.returncode}")


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_server(base: Path, home: Path, workdir: Path, nice: int | None = None) -> Server:
    """``adapterdeck serve`` with its default settings (``nice`` overrides ``vllm.nice``)."""
    port, vllm_port = free_port(), free_port()
    log = workdir / "serve.log"
    config = workdir / "serve.yaml"
    config.write_text("{}\n" if nice is None else f"vllm: {{nice: {nice}}}\n")
    env = {**os.environ, "ADAPTERDECK_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable, "-m", "adapterdeck.core.cli", "serve", "--base", str(base),
        "--port", str(port), "--vllm-port", str(vllm_port), "--max-model-len", "512",
        "--dtype", "float32", "--served-name", SERVED, "--config", str(config),
    ]  # fmt: skip
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Server(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vllm_port}", log)


def wait_ready(server: Server, timeout: float = 600) -> float:
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.proc.returncode}:\n{server.log.read_text()[-3000:]}"
            )
        try:
            report = httpx.get(f"{server.url}/health", timeout=5).json()
            server.vllm_pid = report.get("engines", {}).get("vllm", {}).get("pid") or server.vllm_pid
            if report.get("status") == "ok":
                return time.monotonic() - started
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError(f"server not ready within {timeout} s:\n{server.log.read_text()[-3000:]}")


# --- load generation ---------------------------------------------------------------------------


@dataclass
class Result:
    latency: float
    tokens: int
    ok: bool


@dataclass
class Cell:
    """Figures pooled over the blocks of one side of one cell."""

    wall: float = 0.0
    results: list[Result] = field(default_factory=list)
    cpu: float = 0.0  # gateway process CPU seconds spent during this side's blocks
    vllm_cpu: float = 0.0  # vLLM's processes' CPU seconds spent during this side's blocks
    blocks: list[float] = field(default_factory=list)  # tokens/s of each block, in order

    def add(self, wall: float, results: list[Result], cpu: float = 0.0, vllm_cpu: float = 0.0) -> None:
        self.wall += wall
        self.results += results
        self.blocks.append(sum(r.tokens for r in results) / wall if wall else 0.0)
        self.cpu += cpu
        self.vllm_cpu += vllm_cpu

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.results)

    @property
    def rps(self) -> float:
        return self.n / self.wall if self.wall else 0.0

    @property
    def tps(self) -> float:
        return sum(r.tokens for r in self.results) / self.wall if self.wall else 0.0

    def pct(self, q: float) -> float:
        values = sorted(r.latency for r in self.results if r.ok) or [float("nan")]
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] * 1000


def body(model: str, i: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }


async def one(client: httpx.AsyncClient, url: str, headers: dict[str, str], payload: dict) -> Result:
    started = time.perf_counter()
    try:
        response = await client.post(f"{url}/v1/chat/completions", json=payload, headers=headers)
        latency = time.perf_counter() - started
        if response.status_code != 200:
            say(f"HTTP {response.status_code} for {payload['model']}: {response.text[:200]}")
            return Result(latency, 0, False)
        return Result(latency, int(response.json()["usage"]["completion_tokens"]), True)
    except httpx.HTTPError as exc:
        say(f"{type(exc).__name__} for {payload['model']}: {exc}")
        return Result(time.perf_counter() - started, 0, False)


async def batch(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], payloads: list[dict], concurrency: int
) -> tuple[float, list[Result]]:
    """Send ``payloads`` from ``concurrency`` workers; the wall time and each request's result."""
    queue = list(reversed(payloads))
    results: list[Result] = []

    async def worker() -> None:
        while queue:
            results.append(await one(client, url, headers, queue.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(payloads)))))
    return time.perf_counter() - started, results


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int | None) -> float:
    """utime + stime of every live process in a process group (vLLM's API server, engine core...)."""
    if pgid is None:
        return 0.0
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# --- the three measurements --------------------------------------------------------------------


def paired_ratio(top: Cell, bottom: Cell) -> float:
    """The median over block pairs of top/bottom throughput: each pair ran back to back, so a
    slow drift or a burst of other load on the machine hits both halves of a pair alike."""
    ratios = [t / b for t, b in zip(top.blocks, bottom.blocks, strict=False) if b]
    return statistics.median(ratios) if ratios else 0.0


async def gateway_vs_direct(
    client: httpx.AsyncClient, server: Server, auth: dict[str, str], requests: int, pairs: int
) -> dict[int, tuple[Cell, Cell]]:
    sides = {"gateway": (server.url, auth), "direct": (server.vllm_url, {})}
    for url, headers in sides.values():  # warm both paths (connections, vLLM's first batches)
        await batch(client, url, headers, [body(SERVED, i) for i in range(16)], 8)
    out: dict[int, tuple[Cell, Cell]] = {}
    for concurrency in (1, 8, 32):
        # Blocks of at least 2x the concurrency (so a block is mostly steady state), in pairs
        # G D, D G, G D, ... so that slow drifts of the machine's load hit both sides alike.
        size = max(2 * concurrency, requests // pairs, 8)
        blocks = pairs
        cells = {"gateway": Cell(), "direct": Cell()}
        for pair in range(blocks):
            for turn, side in enumerate(("gateway", "direct") if pair % 2 == 0 else ("direct", "gateway")):
                payloads = [body(SERVED, (2 * pair + turn) * size + i) for i in range(size)]
                url, headers = sides[side]
                cpu0, vcpu0 = cpu_seconds(server.proc.pid), group_cpu_seconds(server.vllm_pid)
                wall, results = await batch(client, url, headers, payloads, concurrency)
                cpu = cpu_seconds(server.proc.pid) - cpu0
                cells[side].add(wall, results, cpu, group_cpu_seconds(server.vllm_pid) - vcpu0)
        out[concurrency] = (cells["gateway"], cells["direct"])
        g, d = out[concurrency]
        say(f"(a) c={concurrency}: gateway {g.rps:.1f} req/s, direct {d.rps:.1f} req/s")
    return out


async def cold_vs_loaded(
    client: httpx.AsyncClient, server: Server, auth: dict[str, str], cold: list[str]
) -> tuple[list[float], list[float], list[float]]:
    first, loaded, base = [], [], []
    for i, name in enumerate(cold):
        for bucket, model in ((first, name), (loaded, name), (loaded, name), (base, SERVED)):
            _, [r] = await batch(client, server.url, auth, [body(model, i)], 1)
            if r.ok:
                bucket.append(r.latency * 1000)
    say(
        f"(c) first {statistics.median(first or [0]):.0f} ms, "
        f"loaded {statistics.median(loaded or [0]):.0f} ms"
    )
    return first, loaded, base


async def adapter_mix(
    client: httpx.AsyncClient,
    server: Server,
    auth: dict[str, str],
    names: list[str],
    requests: int,
    conc: int,
    rounds: int,
) -> dict[tuple[int, str], Cell]:
    warm = await batch(client, server.url, auth, [body(n, i) for i, n in enumerate(names)], 8)
    say(f"(b) warmed {len(names)} adapters in {warm[0]:.1f} s ({sum(not r.ok for r in warm[1])} errors)")
    mixes = {0: [SERVED], 1: names[:1], 8: names[:8], 32: names[:32]}
    # The same mixes sent straight to vLLM (immutable refs, as the gateway sends them) tell the
    # gateway's share of any slowdown from vLLM's.
    sides = {"gateway": (server.url, auth, ""), "direct": (server.vllm_url, {}, "@1")}
    size = max(2 * conc, requests // rounds)
    order = [(k, side) for k in mixes for side in sides]
    cells = {key: Cell() for key in order}
    for round_ in range(rounds):
        for k, side in order if round_ % 2 == 0 else reversed(order):
            url, headers, suffix = sides[side]
            models = [m if m == SERVED else m + suffix for m in mixes[k]]
            payloads = [body(models[i % len(models)], round_ * size + i) for i in range(size)]
            cells[k, side].add(*await batch(client, url, headers, payloads, conc))
        say(f"(b) round {round_ + 1}/{rounds} done")
    return cells


# --- gateway cost breakdown (in-process) -------------------------------------------------------


def breakdown(home: Path, key: str, names: list[str], sample: dict | None) -> dict[str, float]:
    """Per-call cost (ms, median of many) of what the gateway does besides proxying."""
    from adapterdeck.registry import Registry, RegistrySettings
    from adapterdeck.registry.tenants import authenticate

    registry = Registry(RegistrySettings(home=home))

    def timed(fn, reps: int = 300) -> float:
        for _ in range(20):
            fn()
        values = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            values.append(time.perf_counter() - t0)
        return statistics.median(values) * 1000

    async def threaded(fn, reps: int = 300) -> float:
        for _ in range(20):
            await asyncio.to_thread(fn)
        values = []
        for _ in range(reps):
            t0 = time.perf_counter()
            await asyncio.to_thread(fn)
            values.append(time.perf_counter() - t0)
        return statistics.median(values) * 1000

    raw = json.dumps(sample or {}).encode()
    figures = {
        "authenticate (API key -> tenant, 1 query)": timed(lambda: authenticate(registry, key)),
        "registry.resolve (tenant/name, 1 query)": timed(lambda: registry.resolve(names[0])),
        "asyncio.to_thread round trip (no-op)": asyncio.run(threaded(lambda: None)),
        "response json.loads + json.dumps": timed(lambda: json.dumps(json.loads(raw)).encode()),
    }
    registry.engine.dispose()
    return figures


# --- report ------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(
    a: dict[int, tuple[Cell, Cell]],
    b: dict[tuple[int, str], Cell],
    c: tuple[list[float], list[float], list[float]],
    costs: dict[str, float],
    conc_b: int,
) -> None:
    print()
    print("(a) gateway vs direct vLLM — base model, chat, max_tokens 16, blocks interleaved G D, D G, ...")
    head = (
        f"{'conc':>4} {'side':<8} {'n':>4} {'err':>3} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} "
        f"{'p95 ms':>8} {'gw CPU ms/req':>13} {'vLLM CPU ms/req':>15}"
    )
    print(head)
    print("-" * len(head))
    for concurrency, (g, d) in a.items():
        for name, cell in (("gateway", g), ("direct", d)):
            cpu = f"{cell.cpu / cell.n * 1000:13.1f} {cell.vllm_cpu / cell.n * 1000:15.1f}" if cell.n else ""
            print(
                f"{concurrency:>4} {name:<8} {cell.n:>4} {cell.errors:>3} {cell.rps:>7.2f} {cell.tps:>7.1f} "
                f"{cell.pct(0.5):>8.1f} {cell.pct(0.95):>8.1f} {cpu}"
            )
        ratio = paired_ratio(g, d)
        pooled = g.tps / d.tps if d.tps else 0.0
        added = g.pct(0.5) - d.pct(0.5)
        print(
            f"{'':>4} ratio gateway/direct throughput {ratio:.3f} (median of {len(g.blocks)} pairs; "
            f"pooled {pooled:.3f}) (goal >= {GOAL_GATEWAY}) {verdict(ratio >= GOAL_GATEWAY)}; "
            f"p50 added {added:+.1f} ms"
        )
    print()
    rounds = len(b[0, "gateway"].blocks)
    print(
        f"(b) adapters in the mix vs base only — gateway and direct vLLM, concurrency {conc_b}, "
        f"{rounds} rounds (x base: median over rounds of the round's ratio to its base block)"
    )
    head = (
        f"{'adapters':>8} {'side':<8} {'n':>4} {'err':>3} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8}"
        f" {'p95 ms':>8} "
        f"{'x base':>7}"
    )
    print(head)
    print("-" * len(head))
    for (k, side), cell in b.items():
        ratio = paired_ratio(cell, b[0, side])
        mark = "" if k == 0 or side != "gateway" else f"  {verdict(ratio >= GOAL_ADAPTERS)}"
        print(
            f"{k or 'base':>8} {side:<8} {cell.n:>4} {cell.errors:>3} {cell.rps:>7.2f} {cell.tps:>7.1f} "
            f"{cell.pct(0.5):>8.1f} {cell.pct(0.95):>8.1f} {ratio:>7.3f}{mark}"
        )
    print(f"goal: gateway >= {GOAL_ADAPTERS}x base throughput (x base: vs the same side's base row)")
    print()
    first, loaded, base = c
    med = {
        k: statistics.median(v) if v else float("nan") for k, v in (("f", first), ("l", loaded), ("b", base))
    }
    print("(c) first request to a never-loaded adapter vs the same adapter loaded — gateway, one at a time")
    print(
        f"  never-loaded adapter: median {med['f']:8.1f} ms  "
        f"(n={len(first)}; {', '.join(f'{x:.0f}' for x in first)})"
    )
    print(f"  loaded adapter:       median {med['l']:8.1f} ms  (n={len(loaded)})")
    print(f"  base model:           median {med['b']:8.1f} ms  (n={len(base)})")
    print(f"  first-load penalty:   {med['f'] - med['l']:+.1f} ms, {med['f'] / med['l']:.1f}x loaded")
    print()
    print("gateway per-request work besides proxying (in-process, median ms per call, idle-ish machine):")
    for name, ms in costs.items():
        print(f"  {name:<45} {ms:7.3f}")
    print()


async def measure(
    server: Server, key: str, names: list[str], cold: list[str], requests: int, conc_b: int, pairs: int
):
    auth = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=5), limits=limits) as client:
        r = await client.post(f"{server.url}/v1/chat/completions", json=body(SERVED, 0), headers=auth)
        sample = r.json() if r.status_code == 200 else None
        a = await gateway_vs_direct(client, server, auth, requests, pairs)
        c = await cold_vs_loaded(client, server, auth, cold)
        b = await adapter_mix(client, server, auth, names, requests, conc_b, pairs)
    return a, b, c, sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--requests", type=int, default=192, help="requests per side per cell (at least 2x concurrency)"
    )
    parser.add_argument("--vllm-nice", type=int, default=None, help="override serve setting vllm.nice")
    parser.add_argument("--pairs", type=int, default=6, help="blocks per side per cell, interleaved")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench" / "serving")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrency of (b)")
    parser.add_argument("--cold", type=int, default=7, help="never-loaded adapters for (c)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base, home, names, cold, key = prepare(args.workdir, args.cold)
    server = start_server(base, home, args.workdir, args.vllm_nice)
    say(f"server pid {server.proc.pid}, gateway {server.url}, vLLM {server.vllm_url}, log {server.log}")
    try:
        say(f"ready after {wait_ready(server):.0f} s")
        a, b, c, sample = asyncio.run(
            measure(server, key, names, cold, args.requests, args.concurrency, args.pairs)
        )
    finally:
        server.stop()
    costs = breakdown(home, key, names, sample)
    report(a, b, c, costs, args.concurrency)
    say(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
