"""A/B experiments: sticky weighted assignment, lifecycle, statistics, and live routing through real
gateways (``adapterdeck serve --vllm-url``) in front of a real vLLM (the CPU build)."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from adapterdeck.registry import Conflict, NotFound, Registry, RegistrySettings
from adapterdeck.registry.experiments import (
    BUCKETS,
    ExperimentError,
    Experiments,
    Stats,
    compare,
    parse_candidate,
)
from adapterdeck.registry.tenants import create_key

from .conftest import run_cli
from .gateway_helpers import GatewayProcess, start_gateway
from .registry_helpers import claim_vllm, make_lora

USERS = [f"user-{i}" for i in range(10_000)]


# -- the store: assignment, weights, lifecycle (real SQLite) ----------------------------------------


@pytest.fixture(scope="module")
def lora_dirs(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("exp-adapters")
    return [claim_vllm(make_lora(base_model, root / f"a{i}", seed=40 + i), base_model) for i in range(4)]


@pytest.fixture
def store(tmp_path: Path, lora_dirs: list[Path]) -> Iterator[Experiments]:
    registry = Registry(RegistrySettings(home=tmp_path / "home"))
    for path in lora_dirs[:3]:
        registry.publish(path, "acme/support")  # v1, v2, v3
    registry.publish(lora_dirs[3], "acme/other")
    registry.publish(lora_dirs[3], "globex/support")
    yield Experiments(registry)
    registry.close()


def _split(experiment, users=USERS) -> dict[str, str]:
    return {u: experiment.assign(u).name for u in users}


def test_split_matches_the_weights_and_is_sticky(store: Experiments) -> None:
    exp = store.create("acme/support", "v1", [("v2", 20), ("v3", 10)])
    assignment = _split(exp)
    shares = Counter(assignment.values())
    for name, weight in (("v1", 70), ("v2", 20), ("v3", 10)):
        assert abs(shares[name] / len(USERS) * 100 - weight) <= 2, shares
    # The same user gets the same variant: again, and from a fresh read of the database.
    assert _split(exp) == assignment
    assert _split(store.running()["acme/support"]) == assignment
    assert [v["traffic"] for v in exp.to_dict()["variants"]] == [70.0, 20.0, 10.0]


def test_raising_a_weight_moves_users_only_into_that_variant(store: Experiments) -> None:
    store.create("acme/support", "v1", [("v2", 10), ("v3", 20)])
    before = _split(store.get("acme/support"))
    after = _split(store.set_weight("acme/support", "v2", 35))
    moved = Counter((before[u], after[u]) for u in USERS if before[u] != after[u])
    assert set(moved) == {("v1", "v2")}, moved  # nobody moved between v1 and v3, or out of v3 or v2
    assert abs(moved[("v1", "v2")] / len(USERS) * 100 - 25) <= 2
    # Lowering it again moves its newest users back to the control only.
    again = _split(store.set_weight("acme/support", "v2", 5))
    moved = Counter((after[u], again[u]) for u in USERS if after[u] != again[u])
    assert set(moved) == {("v2", "v1")}
    history = [e["action"] for e in store.history(store.get("acme/support").id)]
    assert history == ["create", "set-weight", "set-weight"]


def test_users_without_an_id_are_spread_at_random(store: Experiments) -> None:
    exp = store.create("acme/support", "v1", [("v2", 50)])
    shares = Counter(exp.assign(None).name for _ in range(4000))
    assert 0.45 < shares["v2"] / 4000 < 0.55


def test_bad_definitions_are_refused_with_the_reason(store: Experiments) -> None:
    with pytest.raises(ExperimentError, match="more than 100%"):
        store.create("acme/support", "v1", [("v2", 60), ("v3", 50)])
    with pytest.raises(ExperimentError, match="only uses acme's adapters"):
        store.create("acme/support", "v1", [("globex/support@1", 10)])
    with pytest.raises(NotFound):
        store.create("acme/support", "v1", [("v9", 10)])
    with pytest.raises(ExperimentError, match="named twice"):
        store.create("acme/support", "v1", [("@1", 10)])
    with pytest.raises(ExperimentError, match="percentage"):
        store.create("acme/support", "v1", [("v2", -5)])
    with pytest.raises(ExperimentError, match="REF=WEIGHT"):
        parse_candidate("v2")
    store.create("acme/support", "v1", [("v2", 10)])
    with pytest.raises(Conflict, match="already has a running experiment"):
        store.create("acme/support", "v1", [("v3", 10)])
    with pytest.raises(ExperimentError, match="only a candidate's weight"):
        store.set_weight("acme/support", "v1", 50)
    store.stop("acme/support")
    store.create("acme/support", "v1", [("base", 10), ("acme/other", 5)])
    for variant in ("base", "other@1"):
        with pytest.raises(ExperimentError, match="stop the experiment instead"):
            store.promote("acme/support", variant)


def test_promote_and_stop_move_prod_and_end_the_experiment(store: Experiments) -> None:
    registry = store.registry
    registry.set_alias("acme/support", "prod", 1)
    store.create("acme/support", "v1", [("v2", 10)], shadow="v3")
    # A version an experiment serves cannot be deleted from under it.
    for ref in ("acme/support@2", "acme/support@3"):
        with pytest.raises(Conflict, match="running experiment"):
            registry.delete(ref)
    done = store.promote("acme/support", "v2")
    assert (done.status, done.winner) == ("promoted", "v2")
    assert registry.resolve("acme/support").ref == "acme/support@2"
    assert store.running() == {}
    registry.delete("acme/support@3")  # free again once the experiment ended
    # stop: all traffic back to the control, even though v2 is prod and v2 the newest.
    store.create("acme/support", "v1", [("v2", 90)])
    stopped = store.stop("acme/support")
    assert stopped.status == "stopped"
    assert registry.resolve("acme/support").ref == "acme/support@1"
    assert [h["alias"] for h in registry.alias_history("acme/support")] == ["prod"] * 3


def test_feedback_waits_for_a_flush_already_writing_its_response(store: Experiments) -> None:
    """A rating that arrives while the background flush is writing its response is not refused."""
    import asyncio
    import threading

    from adapterdeck.serve.experiments.traffic import Traffic
    from adapterdeck.serve.outage import DatabaseStatus

    experiment = store.create("acme/support", "v1", [("v2", 50)])
    traffic = Traffic(store.registry, DatabaseStatus())
    entered, release = threading.Event(), threading.Event()
    write = traffic.store.record

    def slow_record(rows):  # the real write, held until the rating has arrived
        entered.set()
        release.wait(10)
        write(rows)

    traffic.store.record = slow_record  # type: ignore[method-assign]

    async def scenario() -> dict:
        row = {"response_id": "chatcmpl-race", "experiment_id": experiment.id, "variant": "v2",
               "shadow": 0, "status": 200, "latency_ms": 5, "prompt_tokens": 1,
               "completion_tokens": 1, "output": None}  # fmt: skip
        traffic.note(row)
        background = asyncio.create_task(traffic.flush())
        await asyncio.to_thread(entered.wait, 10)
        assert traffic.pending == [] and traffic.has_pending("chatcmpl-race")
        waiting = asyncio.create_task(traffic.flush())  # what /v1/feedback does first
        await asyncio.sleep(0.05)
        assert not waiting.done()
        release.set()
        await asyncio.gather(background, waiting)
        assert not traffic.has_pending("chatcmpl-race")
        return traffic.store.feedback("chatcmpl-race", 1.0, "acme")

    result = asyncio.run(scenario())
    assert (result["experiment"], result["variant"]) == ("acme/support", "v2")


def test_the_significance_test_and_the_verdict() -> None:
    def stats(scores: list[float], requests: int = 0, errors: int = 0) -> Stats:
        s = Stats(scores=list(scores))
        s.requests, s.errors = max(requests, len(scores)), errors
        return s

    few = compare("v4", stats([1.0] * 5), "v3", stats([0.0] * 5))
    assert few["verdict"].startswith("not enough data") and few["feedback_p"] is None
    better = compare("v4", stats([1.0] * 40 + [0.0] * 10), "v3", stats([1.0] * 15 + [0.0] * 35))
    assert better["feedback_test"] == "fisher_exact" and better["feedback_p"] < 0.001
    assert better["verdict"].startswith("v4 better than v3, p<0.001")
    same = compare("v4", stats([1.0, 0.0] * 20), "v3", stats([1.0, 0.0] * 20))
    assert same["verdict"].startswith("no significant difference") and same["feedback_p"] == 1.0
    worse = compare("v4", stats([2.0, 2.5, 3.0] * 10), "v3", stats([4.0, 4.5, 5.0] * 10))
    assert worse["feedback_test"] == "welch_t" and worse["verdict"].startswith("v4 worse than v3")
    errors = compare("v4", stats([], requests=200, errors=40), "v3", stats([], requests=200, errors=1))
    assert "v4 has more errors" in errors["verdict"] and errors["errors_p"] < 0.001


def test_buckets_always_cover_every_user_exactly_once(store: Experiments) -> None:
    store.create("acme/support", "v1", [("v2", 33.33), ("v3", 0)])
    for weight in (0, 12.5, 66.67, 1, 50):
        exp = store.set_weight("acme/support", "v3", weight)
        ranges = sorted(r for v in exp.variants for r in v.buckets)
        covered = sum(end - start for start, end in ranges)
        assert covered == BUCKETS and all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))


# -- through real gateways and a real vLLM ------------------------------------------------------------


@dataclass
class Stack:
    home: Path
    registry: Registry
    vllm_url: str
    base: Path
    keys: dict[str, str]
    root: Path

    def start_gateway(self) -> Gateway:
        gateway = start_gateway(
            self.base,
            self.vllm_url,
            {"ADAPTERDECK_HOME": str(self.home)},
            self.root,
            cls=Gateway,
            ready=lambda reply: reply.status_code == 200,
        )
        gateway.keys = self.keys
        return gateway


@dataclass
class Gateway(GatewayProcess):
    keys: dict[str, str] = field(default_factory=dict)

    def client(self, who: str = "acme") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[who], max_retries=0, timeout=60)

    def call(self, user: str | None, who: str = "acme", model: str = "acme/chat") -> tuple[str, str, str]:
        """(response id, model that served, variant header)."""
        raw = self.client(who).chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "Hi, this is Tom. The courier lost my tablet."}],
            max_tokens=4,
            temperature=0,
            **({"user": user} if user else {}),
        )
        parsed = raw.parse()
        return parsed.id, parsed.model, raw.headers.get("x-adapterdeck-variant", "")

    def api(
        self, method: str, path: str, who: str = "acme", headers: dict[str, str] | None = None, **kw
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}", **(headers or {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kw)


@pytest.fixture(scope="module")
def stack(
    base_model: Path,
    vllm_home: Path,
    vllm_server: str,
    lora_dirs: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    registry = Registry(RegistrySettings(home=vllm_home))
    for path in lora_dirs[:3]:
        registry.publish(path, "acme/chat")  # v1, v2, v3: three distinct random LoRAs
    registry.set_alias("acme/chat", "prod", 1)
    registry.publish(lora_dirs[3], "globex/chat")
    keys = {"acme": create_key(registry, "acme"), "globex": create_key(registry, "globex")}
    keys["admin"] = create_key(registry, None)
    yield Stack(vllm_home, registry, vllm_server, base_model, keys, tmp_path_factory.mktemp("exp-gw"))
    registry.close()


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[Gateway]:
    gw = stack.start_gateway()
    yield gw
    gw.stop()


def _cli(args: list[str], env: dict[str, str]):
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    return result


def _wait_until(predicate, timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "not within the time limit"
        time.sleep(0.05)
    return time.monotonic() - started


def test_an_experiment_end_to_end_with_feedback_and_a_verdict(stack: Stack, gateway: Gateway) -> None:
    definition = {
        "name": "acme/chat",
        "control": "v1",
        "candidates": [{"ref": "v2", "weight": 50}],
        "shadow": "v3",
    }
    for retention, says in (({"max_age": -3600}, "must be above 0"), ({"max_responses": 0}, ">= 1")):
        bad = gateway.api("POST", "/v1/experiments", json={**definition, "retention": retention})
        assert bad.status_code == 400 and says in bad.json()["error"]["message"], bad.text
    created = gateway.api("POST", "/v1/experiments", json={**definition, "retention": {"max_age": "7d"}})
    assert created.status_code == 201, created.text
    assert created.json()["settings"]["retention"] == {"max_age": 604800.0, "max_responses": None}
    # Another tenant can neither see nor manage it (the same 404 as an unknown experiment).
    assert gateway.api("GET", "/v1/experiments/acme/chat", who="globex").status_code == 404
    assert gateway.api("POST", "/v1/experiments/acme/chat/stop", who="globex").status_code == 404
    assert gateway.api("GET", "/v1/experiments", who="globex").json()["data"] == []

    served: dict[str, list[str]] = {"v1": [], "v2": []}
    for i in range(60):
        response_id, model, variant = gateway.call(f"customer-{i}")
        # The response names the immutable ref of the variant that served it; never the shadow.
        assert model == {"v1": "acme/chat@1", "v2": "acme/chat@2"}[variant]
        served[variant].append(response_id)
        assert gateway.call(f"customer-{i}")[2] == variant  # sticky
    assert len(served["v1"]) >= 15 and len(served["v2"]) >= 15, {k: len(v) for k, v in served.items()}

    # Simulated users like v2's answers more than v1's.
    for variant, ids in served.items():
        for n, response_id in enumerate(ids):
            thumbs = "up" if (variant == "v2") == (n % 5 != 0) else "down"
            reply = gateway.api("POST", "/v1/feedback", json={"response_id": response_id, "thumbs": thumbs})
            assert reply.status_code == 200, reply.text
    assert (
        gateway.api(
            "POST", "/v1/feedback", json={"response_id": served["v1"][0], "score": 1}, who="globex"
        ).status_code
        == 404
    )
    bad = gateway.api(
        "POST", "/v1/feedback", json={"response_id": served["v1"][0], "score": 1, "thumbs": "up"}
    )
    assert bad.status_code == 400 and "exactly one" in bad.json()["error"]["message"]

    # The shadow got a copy of the traffic and its answers were recorded.
    def shadowed() -> int:
        report = gateway.api("GET", "/v1/experiments/acme/chat").json()
        return report["shadow"]["requests"]

    _wait_until(lambda: shadowed() >= 100, timeout=30)

    # `experiment show` reads the same database: both variants, their counts and a verdict.
    shown = _cli(["experiment", "show", "acme/chat", "--json"], env={"ADAPTERDECK_HOME": str(stack.home)})
    report = json.loads(shown.stdout)
    by_name = {v["name"]: v for v in report["variants"]}
    assert by_name["v1"]["requests"] == 2 * len(served["v1"])
    assert by_name["v2"]["requests"] == 2 * len(served["v2"])
    assert by_name["v2"]["feedback"] == len(served["v2"]) and by_name["v2"]["completion_tokens"] > 0
    assert report["verdict"].startswith("v2 better than v1, p=") or report["verdict"].startswith(
        "v2 better than v1, p<"
    ), report["verdict"]
    assert report["shadow"]["recent_outputs"]
    text = _cli(["experiment", "show", "acme/chat"], env={"ADAPTERDECK_HOME": str(stack.home)}).stdout
    assert "v1 (control)" in text and "v2 (candidate)" in text and "verdict: v2 better" in text

    metrics = gateway.api("GET", "/metrics").text
    assert 'experiment="acme/chat"' in metrics and 'variant="v2"' in metrics
    assert 'adapterdeck_shadow_requests_total{experiment="acme/chat",status="200",variant="v3"}' in metrics
    assert 'adapterdeck_feedback_total{experiment="acme/chat",variant="v2"}' in metrics

    # Promote through the API: prod moves to v2 and acme/chat serves v2 to everyone at once.
    promoted = gateway.api("POST", "/v1/experiments/acme/chat/promote", json={"variant": "v2"})
    assert promoted.status_code == 200 and promoted.json()["status"] == "promoted"
    assert {gateway.call(f"customer-{i}")[1] for i in range(10)} == {"acme/chat@2"}
    assert gateway.call("customer-0")[2] == ""  # no longer an experiment


def test_cli_changes_are_live_within_a_second_and_survive_a_restart(stack: Stack, gateway: Gateway) -> None:
    env = {"ADAPTERDECK_HOME": str(stack.home)}
    refused = run_cli(
        "experiment",
        "create",
        "acme/chat",
        "--control",
        "v1",
        "--candidate",
        "v3=0",
        "--keep-for=-2d",
        env=env,
    )
    assert refused.returncode != 0 and "must be above 0" in refused.stderr + refused.stdout
    _cli(
        [
            "experiment",
            "create",
            "acme/chat",
            "--control",
            "v1",
            "--candidate",
            "v3=0",
            "--keep-responses",
            "5000",
        ],
        env=env,
    )
    pruned = _cli(["experiment", "prune", "acme/chat"], env=env).stdout
    assert "0 responses folded into the aggregates" in pruned, pruned
    _wait_until(lambda: gateway.call("someone")[2] == "v1")
    users = [f"u{i}" for i in range(40)]
    assert {gateway.call(u)[2] for u in users} == {"v1"}
    _cli(["experiment", "set-weight", "acme/chat", "v3", "100"], env=env)
    took = _wait_until(lambda: gateway.call("someone")[2] == "v3", timeout=3)
    assert took < 1.0
    assert {gateway.call(u)[1] for u in users} == {"acme/chat@3"}

    _cli(["experiment", "set-weight", "acme/chat", "v3", "50"], env=env)
    _wait_until(lambda: len({gateway.call(u)[2] for u in users}) == 2)
    before = {u: gateway.call(u)[2] for u in users}
    # Without a `user` field, the X-User-Id header identifies the user.
    for u in users[:10]:
        body = {"model": "acme/chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        reply = gateway.api("POST", "/v1/chat/completions", json=body, headers={"X-User-Id": u})
        assert reply.headers["x-adapterdeck-variant"] == before[u]
    # A second gateway (and this one, restarted) routes every user the same way.
    other = stack.start_gateway()
    try:
        assert {u: other.call(u)[2] for u in users} == before
    finally:
        other.stop()
    gateway.stop()
    restarted = stack.start_gateway()
    try:
        assert {u: restarted.call(u)[2] for u in users} == before
        # Requests without a user id fall back to the API key: one key, one variant.
        assert len({restarted.call(None)[2] for _ in range(6)}) == 1
        _cli(["experiment", "stop", "acme/chat"], env=env)
        _wait_until(lambda: restarted.call("someone")[2] == "")
        assert {restarted.call(u)[1] for u in users} == {"acme/chat@1"}  # all back to the control
    finally:
        restarted.stop()
