"""Serving through the gateway: a real `adapterdeck serve` that starts and supervises a real vLLM
(CPU build), real adapters from a real registry, called with the official `openai` client."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from adapterdeck.core.config import parse_config
from adapterdeck.core.demo import demo_config, write_demo_dataset
from adapterdeck.core.train import run_training
from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.tenants import create_key

from .conftest import free_port
from .gateway_helpers import health_ok, launch, wait_ready
from .registry_helpers import make_lora

pytestmark = pytest.mark.vllm

SUPPORT = "Classify the support message. Answer with JSON: category and priority."
PROMPTS = [
    "Hi, this is Tom. The courier lost my tablet (order 1234). No rush at all.",
    "Hi, this is Nora. I was charged twice for the kettle (order 5521). This is urgent.",
    "Hi, this is Ben. My password reset fails for the router (order 8812). Thanks.",
    "Hi, this is Aiko. The app crashes with my headphones (order 3300). Help asap please.",
    "The blender is excellent and it works great. Bought by Omar in 2024.",
    "The jacket broke in a week but it is lovely. Bought by Sara in 2021.",
    "Hi, this is Ivan. Tracking shows no movement for the desk lamp (order 7777). Not urgent.",
    "The router is terrible and it stopped working. Bought by Lena in 2020.",
    "Hi, this is Carlos. I want a refund for my tablet (order 4040). Whenever you have time.",
    "The kettle arrived quickly and it is well made. Bought by Priya in 2026.",
]


@dataclass
class Serving:
    url: str
    vllm_url: str
    registry: Registry
    base: Path
    keys: dict[str, str]
    adapters: dict[str, Path]
    proc: subprocess.Popen
    log: Path

    def client(self, who: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[who], max_retries=0, timeout=120)

    def health(self) -> dict:
        """The whole report: the admin key's (without a key, /health says only the status)."""
        admin = {"Authorization": f"Bearer {self.keys['admin']}"}
        return httpx.get(f"{self.url}/health", headers=admin, timeout=10).json()


def _train(base: Path, task: str, out: Path) -> Path:
    data = write_demo_dataset(out.parent / f"{task}.jsonl", task=task, n=300)
    config = demo_config(base, data, out, task=task)
    config["train"].update(epochs=4)
    config["eval"] = {"evaluators": ["exact_match"], "samples": 0}
    run_training(parse_config(config))
    return out


def _wait(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(1)
    raise AssertionError(f"{what} not within {timeout} s; log:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def serving(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    root = tmp_path_factory.mktemp("serving")
    home = root / "home"
    settings = RegistrySettings(home=home)
    registry = Registry(settings)
    adapters = {
        "acme/support": _train(base_model, "support", root / "runs" / "support"),
        "globex/sentiment": _train(base_model, "sentiment", root / "runs" / "sentiment"),
        "acme/random": make_lora(base_model, root / "random-a", seed=11),
        "globex/random": make_lora(base_model, root / "random-g", seed=12),
    }
    for name, path in adapters.items():
        registry.publish(path, name, alias="prod")
    keys = {
        "acme": create_key(registry, "acme"),
        "globex": create_key(registry, "globex"),
        "admin": create_key(registry, None),
    }
    port, vllm_port = free_port(), free_port()
    env = {"ADAPTERDECK_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    args = [
        "--base", base_model, "--port", str(port), "--vllm-port", str(vllm_port), "--max-model-len", "512",
        "--served-name", "tiny", "--dtype", "float32",
    ]  # fmt: skip
    process = launch("serve", args, env, root / "serve.log")
    serving = Serving(
        f"http://127.0.0.1:{port}",
        f"http://127.0.0.1:{vllm_port}",
        registry,
        base_model,
        keys,
        adapters,
        process.proc,
        process.log,
    )
    try:
        wait_ready(
            process, serving.url, health_ok, timeout=600, interval=1, request_timeout=10,
            headers={"Authorization": f"Bearer {keys['admin']}"}, what="the gateway and vLLM",
        )  # fmt: skip
        yield serving
    finally:
        process.stop(timeout=60)
        registry.close()


def chat(client: openai.OpenAI, model: str, prompt: str, **kw) -> openai.types.chat.ChatCompletion:
    system = (
        SUPPORT
        if "order" in prompt
        else "Read the review. Answer with one word: positive, negative or mixed."
    )
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    return client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, **kw)


def peft_greedy(base: Path, adapter: Path, prompts: list[str]) -> list[str]:
    """What PEFT itself generates greedily for each prompt with the adapter on the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapterdeck.core.basemodel import load_tokenizer, render_chat

    tokenizer = load_tokenizer(str(base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    out = []
    for prompt in prompts:
        system = (
            SUPPORT
            if "order" in prompt
            else "Read the review. Answer with one word: positive, negative or mixed."
        )
        text = render_chat(
            tokenizer,
            [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            add_generation_prompt=True,
        )
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id
            )
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out


def test_four_adapters_at_once_each_answer_like_peft(serving: Serving) -> None:
    owners = {
        "acme/support": "acme",
        "globex/sentiment": "globex",
        "acme/random": "acme",
        "globex/random": "globex",
    }
    jobs = [(name, prompt) for prompt in PROMPTS for name in owners]

    def call(job: tuple[str, str]) -> tuple[str, str, str, str]:
        name, prompt = job
        reply = chat(serving.client(owners[name]), name, prompt)
        return name, prompt, reply.model, (reply.choices[0].message.content or "").strip()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, jobs))
    assert all(served == f"{name}@1" for name, _, served, _ in results)
    answers = {(name, prompt): text for name, prompt, _, text in results}
    matched = total = 0
    for name, path in serving.adapters.items():
        expected = peft_greedy(
            serving.base, path / "adapter" if (path / "adapter").exists() else path, PROMPTS
        )
        for prompt, want in zip(PROMPTS, expected, strict=True):
            total += 1
            matched += answers[(name, prompt)] == want
        same = sum(answers[(name, p)] == w for p, w in zip(PROMPTS, expected, strict=True))
        print(f"{name}: vLLM matched PEFT on {same}/{len(PROMPTS)}")
    rate = matched / total
    print(f"vLLM matched PEFT greedy generation on {matched}/{total} prompts ({rate:.0%})")
    assert rate >= 0.9
    # Each adapter answers in its own way: the four outputs for one prompt are not all alike.
    for prompt in PROMPTS:
        assert len({answers[(name, prompt)] for name in owners}) >= 3
    support = [answers[("acme/support", p)] for p in PROMPTS if "order" in p]
    assert sum(a.startswith('{"category": ') for a in support) >= len(support) - 1


def test_base_and_aliases_resolve_to_immutable_refs(serving: Serving) -> None:
    client = serving.client("acme")
    assert chat(client, "tiny", PROMPTS[0]).model == "tiny"
    for model in ("acme/support", "acme/support:prod", "acme/support@1"):
        reply = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=4, temperature=0
        )
        assert reply.headers["x-adapterdeck-ref"] == "acme/support@1"
        assert reply.parse().model == "acme/support@1"
    completion = client.completions.create(model="acme/support", prompt="Hello", max_tokens=4, temperature=0)
    assert completion.model == "acme/support@1" and completion.usage.completion_tokens > 0


def test_a_tenant_sees_and_calls_only_its_own(serving: Serving) -> None:
    acme = {m.id for m in serving.client("acme").models.list()}
    assert {"tiny", "acme/support", "acme/support@1", "acme/support:prod", "acme/random"} <= acme
    assert not any(m.startswith("globex/") for m in acme)
    messages = []
    for model in ("globex/sentiment", "globex/sentiment@1", "globex/nothing", "acme/nothing@3"):
        with pytest.raises(openai.NotFoundError) as info:
            chat(serving.client("acme"), model, PROMPTS[0])
        messages.append(info.value.body["message"].replace(model, "M"))
    assert len(set(messages)) == 1  # another tenant's adapter looks exactly like a missing one


def test_streaming_with_the_openai_client(serving: Serving) -> None:
    client = serving.client("acme")
    whole = (chat(client, "acme/support", PROMPTS[1]).choices[0].message.content or "").strip()
    chunks = list(chat(client, "acme/support", PROMPTS[1], stream=True))
    assert len(chunks) > 3 and all(c.model == "acme/support@1" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == whole
    with_usage = list(
        chat(client, "acme/support", PROMPTS[1], stream=True, stream_options={"include_usage": True})
    )
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens > 0


def test_an_adapter_published_while_serving_is_served_at_once(serving: Serving, tmp_path: Path) -> None:
    fresh = make_lora(serving.base, tmp_path / "fresh", seed=99)
    files = [("files", (p.name, p.read_bytes())) for p in fresh.iterdir() if p.is_file()]
    admin = {"Authorization": f"Bearer {serving.keys['admin']}"}
    refused = httpx.post(
        f"{serving.url}/v1/adapters/acme/late/versions",
        files=files,
        headers={"Authorization": f"Bearer {serving.keys['acme']}"},
        timeout=60,
    )
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    published = httpx.post(
        f"{serving.url}/v1/adapters/acme/late/versions", files=files, headers=admin, timeout=60
    )
    assert published.status_code == 201, published.text
    assert published.json()["ref"] == "acme/late@1"
    assert chat(serving.client("acme"), "acme/late", PROMPTS[0]).model == "acme/late@1"
    # A second version and an alias move go live on the next request, no restart.
    serving.registry.publish(make_lora(serving.base, tmp_path / "fresh2", seed=100), "acme/late")
    assert chat(serving.client("acme"), "acme/late", PROMPTS[0]).model == "acme/late@2"
    moved = httpx.put(
        f"{serving.url}/v1/adapters/acme/late/aliases/prod", json={"version": 1}, headers=admin, timeout=30
    )
    assert moved.status_code == 200, moved.text
    assert chat(serving.client("acme"), "acme/late", PROMPTS[0]).model == "acme/late@1"
    assert serving.health()["engines"]["vllm"]["restarts"] == 0


def test_bad_requests_get_json_errors(serving: Serving) -> None:
    key = {"Authorization": f"Bearer {serving.keys['acme']}"}
    url = f"{serving.url}/v1/chat/completions"
    cases = [
        (httpx.post(url, content=b"{not json", headers={**key, "content-type": "application/json"}), 400),
        (httpx.post(url, json={"model": "tiny"}, headers=key), 400),
        (httpx.post(url, json={"messages": []}, headers=key), 400),
        (httpx.post(url, json={"model": "tiny", "messages": []}), 401),
        (
            httpx.post(url, json={"model": "tiny", "messages": []}, headers={"Authorization": "Bearer nope"}),
            401,
        ),
        (httpx.post(url, json={"model": "../../etc", "messages": []}, headers=key), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) >= {"message", "type"}


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_metrics_and_health(serving: Serving) -> None:
    # The vLLM server the gateway started listens on loopback only.
    vllm_port = int(serving.health()["engines"]["vllm"]["url"].rsplit(":", 1)[1])
    assert _listening_addresses(vllm_port) == {"0100007F"}  # 127.0.0.1
    chat(serving.client("globex"), "globex/sentiment", PROMPTS[4])
    admin = {"Authorization": f"Bearer {serving.keys['admin']}"}
    assert httpx.get(f"{serving.url}/metrics", timeout=10).status_code == 401
    text = httpx.get(f"{serving.url}/metrics", headers=admin, timeout=10).text
    assert (
        'adapterdeck_requests_total{endpoint="/v1/chat/completions",engine="vllm",experiment="",'
        'model="globex/sentiment@1",status="200",tenant="globex",variant=""}' in text
    )
    for name in (
        "adapterdeck_request_latency_seconds_bucket",
        "adapterdeck_prompt_tokens_total",
        "adapterdeck_completion_tokens_total",
        "adapterdeck_adapter_loads_total",
        "adapterdeck_adapter_load_seconds_bucket",
    ):
        assert name in text
    health = serving.health()
    assert health["gateway"] == "ok" and health["engines"]["vllm"]["status"] == "ready"


def test_a_prefix_adapter_is_served_by_the_embedded_peft_engine(serving: Serving, tmp_path: Path) -> None:
    data = write_demo_dataset(tmp_path / "support.jsonl", task="support", n=120)
    config = demo_config(serving.base, data, tmp_path / "prefix", task="support")
    config["method"] = {"name": "prefix", "virtual_tokens": 8}
    config["train"].update(max_steps=10, learning_rate=3e-2)
    config["eval"] = {"evaluators": ["loss"], "samples": 0}
    run_training(parse_config(config))
    info = serving.registry.publish(tmp_path / "prefix", "acme/prefixed")
    assert info.served_by == ["peft"]
    client = serving.client("acme")
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda p: chat(client, "acme/prefixed", p), PROMPTS[:4]))
    assert all(r.model == "acme/prefixed@1" for r in replies)
    expected = peft_greedy(serving.base, tmp_path / "prefix" / "adapter", PROMPTS[:4])
    assert [(r.choices[0].message.content or "").strip() for r in replies] == expected
    streamed = list(chat(client, "acme/prefixed", PROMPTS[0], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == expected[0]
    peft = serving.health()["engines"]["peft"]
    assert peft["adapters"] == 1 and peft["largest_batch"] >= 2  # concurrent requests were batched


def test_a_guardrail_breach_rolls_a_live_experiment_back(serving: Serving) -> None:
    """acme/support (trained: JSON answers) against a random LoRA (no JSON) on a 50/50 split, with a
    json_valid guardrail: the gateway scores the live answers, finds the candidate worse beyond the
    margin by the always-valid test, and stops the experiment by itself (traffic back to the
    control), with the reason in the history and the metrics."""
    acme = {"Authorization": f"Bearer {serving.keys['acme']}"}
    url = f"{serving.url}/v1/experiments"
    body = {"name": "acme/support", "control": "v1", "candidates": [{"ref": "acme/random@1", "weight": 50}]}
    for rails, says in (
        ([{"metric": "json_valid", "margin": "a lot"}], "expected a number"),
        ([{"metric": "exact_match", "margin": 0.1}], "cannot score live answers"),
        ([{"metric": "latency", "margin": 0.1}], "not one of error_rate, latency_p95, completion_tokens"),
        ([{"metric": "error_rate", "margin": -1}], ">= 0"),
    ):
        bad = httpx.post(url, json={**body, "guardrails": rails}, headers=acme, timeout=30)
        assert bad.status_code == 400 and says in bad.json()["error"]["message"], bad.text
    rails = [{"metric": "json_valid", "margin": 0.1}, {"metric": "error_rate", "margin": 0.05}]
    created = httpx.post(url, json={**body, "guardrails": rails, "shadow": "base"}, headers=acme, timeout=30)
    assert created.status_code == 201, created.text
    assert created.json()["settings"]["evaluators"] == ["json_valid"]  # named by a guardrail
    assert created.json()["shadow"]["name"] == "base"

    client = serving.client("acme")
    messages = [{"role": "system", "content": SUPPORT}, {"role": "user", "content": PROMPTS[0]}]
    sent = by_candidate = 0
    while True:
        raw = client.chat.completions.with_raw_response.create(
            model="acme/support", messages=messages, max_tokens=64, temperature=0, user=f"u{sent}"
        )
        if not raw.headers.get("x-adapterdeck-variant"):
            break  # no experiment routes acme/support any more
        sent += 1
        by_candidate += raw.parse().model == "acme/random@1"
        assert sent < 400, "the guardrail never fired"
    print(f"json_valid guardrail: the experiment was rolled back after {sent} requests, "
          f"{by_candidate} of them answered by the candidate")  # fmt: skip
    # The shadow (the base, never answering) was judged by the live evaluator too: its copies are
    # scored when the gateway writes them, and the last ones may still be on their way.
    deadline = time.monotonic() + 30
    while True:
        report = httpx.get(f"{url}/acme/support", headers=acme, timeout=30).json()
        shadowed = report["live_evaluators"]["base"]["json_valid"]["scored"]
        if report["shadow"]["requests"] >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(f"the shadow (base): {report['shadow']['requests']} copies, {shadowed} scored by json_valid, "
          f"mean {report['live_evaluators']['base']['json_valid']['mean']}")  # fmt: skip
    assert shadowed >= 10, report["live_evaluators"]
    assert report["status"] == "stopped"
    stop = report["history"][-1]
    assert stop["action"] == "stop" and stop["by"] == "guardrail", stop
    assert "guardrail json_valid breached by random@1" in stop["reason"], stop
    live = report["live_evaluators"]
    assert live["v1"]["json_valid"]["mean"] >= 0.9 and live["random@1"]["json_valid"]["mean"] == 0.0, live
    rail = next(g for g in report["guardrails"] if g["metric"] == "json_valid")
    assert rail["status"] == "breached" and rail["ci"][1] < -0.1, rail
    assert next(g for g in report["guardrails"] if g["metric"] == "error_rate")["status"] != "breached"
    metrics = httpx.get(f"{serving.url}/metrics", headers=acme, timeout=30).text
    assert (
        'adapterdeck_experiment_decisions_total{decision="rollback",experiment="acme/support",'
        'metric="json_valid",variant="random@1"} 1.0'
    ) in metrics
    # Everyone is back on the control.
    for i in range(5):
        reply = client.chat.completions.create(
            model="acme/support", messages=messages, max_tokens=8, temperature=0, user=f"u{i}"
        )
        assert reply.model == "acme/support@1"


def test_killing_vllm_under_load_fails_fast_and_service_returns(serving: Serving) -> None:
    outcomes: list[tuple[float, int, float]] = []  # (when, status, seconds)
    stop = threading.Event()
    headers = {"Authorization": f"Bearer {serving.keys['acme']}"}
    body = {"model": "acme/support", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8}

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    status = client.post(
                        f"{serving.url}/v1/chat/completions", json=body, headers=headers
                    ).status_code
                except httpx.HTTPError:
                    status = -1
                outcomes.append((started, status, time.monotonic() - started))
                if status != 200:
                    time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        pid = serving.health()["engines"]["vllm"]["pid"]
        killed = time.monotonic()
        os.killpg(pid, signal.SIGKILL)

        # Right after the kill /health may still say ok (the supervisor has not seen the exit yet):
        # back means restarted once and ready again.
        def back() -> bool:
            health = serving.health()
            return health["engines"]["vllm"]["restarts"] == 1 and health["status"] == "ok"

        _wait(back, 600, "vLLM to come back", serving.log)
        _wait(
            lambda: any(t > killed and s == 200 for t, s, _ in outcomes), 60, "a served request", serving.log
        )
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
    after = [(t, s, d) for t, s, d in outcomes if t > killed]
    statuses = {s for _, s, _ in outcomes}
    assert statuses <= {200, 503}, statuses  # 503 while vLLM is away, never another failure
    assert 503 in statuses and any(s == 200 for _, s, _ in after)
    # Failures come fast (no request hangs on the dead engine).
    assert max(d for _, s, d in outcomes if s == 503) < 5
    recovery = min(t for t, s, _ in after if s == 200) - killed
    print(f"vLLM killed under load: {sum(s == 503 for _, s, _ in after)} requests got 503, "
          f"service back after {recovery:.1f} s")  # fmt: skip
    assert serving.health()["engines"]["vllm"]["restarts"] == 1
    assert chat(serving.client("acme"), "acme/support", PROMPTS[0]).model == "acme/support@1"


def test_sigterm_stops_everything(serving: Serving) -> None:
    vllm_pid = serving.health()["engines"]["vllm"]["pid"]
    serving.proc.send_signal(signal.SIGTERM)
    serving.proc.wait(timeout=90)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is a clean exit.
    assert serving.proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in serving.log.read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(vllm_pid, 0)
