"""An experiment's own rules on a real SQLite registry: guardrails checked with the always-valid
test, the live evaluators' scores per variant, rollback on a breach, auto-promote on a win, and
the settings refused with the reason."""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.experiments import ExperimentError, Experiments
from adapterdeck.registry.experiments.model import parse_guardrail, parse_settings
from adapterdeck.registry.refs import parse_ref

from .registry_helpers import claim_vllm, make_lora

TICKS = itertools.count()  # each recorded response a millisecond after the one before


@pytest.fixture(scope="module")
def lora_dirs(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("guard-adapters")
    return [claim_vllm(make_lora(base_model, root / f"a{i}", seed=60 + i), base_model) for i in range(2)]


@pytest.fixture
def store(tmp_path: Path, lora_dirs: list[Path]) -> Iterator[Experiments]:
    registry = Registry(RegistrySettings(home=tmp_path / "home"))
    for path in lora_dirs:
        registry.publish(path, "acme/support")  # v1, v2
    registry.set_alias("acme/support", "prod", 1)
    yield Experiments(registry)
    registry.close()


def _rows(store: Experiments, variant: str, n: int, *, status: int = 200, evals=None, score=None, **kw):
    """Record ``n`` served responses of ``variant`` of the running acme/support experiment."""
    experiment = store.get("acme/support")
    rows = []
    for _ in range(n):
        rows.append(
            {
                "response_id": f"r-{uuid.uuid4().hex}",
                "experiment_id": experiment.id,
                "variant": variant,
                "shadow": 0,
                "status": status,
                "latency_ms": kw.get("latency", 100),
                "prompt_tokens": 10,
                "completion_tokens": kw.get("tokens", 20),
                "output": None,
                "evals": evals,
                "score": score,
                "at": datetime.now(UTC) + timedelta(milliseconds=next(TICKS)),
            }
        )
    store.record(rows)


def _interleaved(store: Experiments, sides: dict[str, dict], n: int) -> None:
    """``n`` responses per variant, alternating, each with its side's columns."""
    for _ in range(n):
        for variant, kw in sides.items():
            _rows(store, variant, 1, **kw)


def test_settings_are_refused_with_the_reason() -> None:
    cases = [
        (lambda: parse_settings([("latency", 0.1)]), "not one of error_rate, latency_p95, completion_tokens"),
        (lambda: parse_settings([("exact_match", 0.1)]), "cannot score live answers"),
        (lambda: parse_settings([("error_rate", "lots")]), "expected a number"),
        (lambda: parse_settings([("error_rate", float("nan"))]), "finite"),
        (lambda: parse_settings([("error_rate", -0.1)]), ">= 0"),
        (lambda: parse_settings([("error_rate", 0.1), ("error_rate", 0.2)]), "given twice"),
        (lambda: parse_settings(evaluators=["nope"]), "unknown evaluator 'nope'"),
        (lambda: parse_settings(eval_sample=0), "in (0, 1]"),
        (lambda: parse_guardrail("error_rate"), "expected METRIC=MARGIN"),
    ]
    for make, says in cases:
        with pytest.raises(ExperimentError) as err:
            make()
        assert says in str(err.value), (says, str(err.value))
    settings = parse_settings([("json_valid", "0.05"), ("latency_p95", 0.2)], auto_promote=True)
    assert settings.evaluators == ["json_valid"] and settings.guardrails[0].margin == 0.05


def test_a_breached_guardrail_stops_the_experiment_with_the_reason(store: Experiments) -> None:
    settings = parse_settings([("json_valid", 0.1), ("error_rate", 0.05)])
    store.create("acme/support", "v1", [("v2", 50)], settings=settings)
    _interleaved(store, {"v1": {"evals": {"json_valid": 1.0}}, "v2": {"evals": {"json_valid": 1.0}}}, 12)
    report = store.report("acme/support")
    assert {g["status"] for g in report["guardrails"]} == {"holds"} and report["decision"] is None
    assert store.enforce("acme/support") is None and store.get("acme/support").status == "running"
    # From now on v2's answers are not JSON.
    _interleaved(store, {"v1": {"evals": {"json_valid": 1.0}}, "v2": {"evals": {"json_valid": 0.0}}}, 25)
    report = store.report("acme/support")
    assert report["live_evaluators"]["v2"]["json_valid"] == {"scored": 37, "mean": round(12 / 37, 4)}
    rail = next(g for g in report["guardrails"] if g["metric"] == "json_valid")
    assert rail["status"] == "breached" and rail["ci"][1] < -0.1
    decision = store.enforce("acme/support")
    assert decision is not None and decision["decision"] == "rollback" and decision["metric"] == "json_valid"
    ended = store.report("acme/support")
    assert ended["status"] == "stopped"
    assert ended["history"][-1]["by"] == "guardrail" and "json_valid" in ended["history"][-1]["reason"]
    assert store.enforce("acme/support") is None  # already ended: nothing more happens


def test_error_rate_latency_and_tokens_guardrails(store: Experiments) -> None:
    settings = parse_settings([("error_rate", 0.02), ("latency_p95", 0.5), ("completion_tokens", 0.5)])
    store.create("acme/support", "v1", [("v2", 50)], settings=settings)
    rng = random.Random(3)
    for _ in range(60):
        _rows(store, "v1", 1, latency=rng.randint(90, 110), tokens=20)
        # v2: twice as slow, answers three times as long, and fails one request in two.
        _rows(store, "v2", 1, latency=rng.randint(180, 220), tokens=60, status=rng.choice([200, 500]))
    report = store.report("acme/support")
    status = {g["metric"]: g["status"] for g in report["guardrails"]}
    assert status == {"error_rate": "breached", "latency_p95": "breached", "completion_tokens": "breached"}
    latency = next(g for g in report["guardrails"] if g["metric"] == "latency_p95")
    assert latency["threshold_ms"] == pytest.approx(1.5 * latency["control_value"], rel=0.01)


def test_a_guardrail_within_its_margin_holds(store: Experiments) -> None:
    settings = parse_settings([("completion_tokens", 0.5)])
    store.create("acme/support", "v1", [("v2", 50)], settings=settings)
    _interleaved(store, {"v1": {"tokens": 20}, "v2": {"tokens": 24}}, 40)  # 20% more: tolerated
    report = store.report("acme/support")
    assert report["guardrails"][0]["status"] == "holds" and report["decision"] is None


def test_auto_promote_needs_a_win_and_every_guardrail_holding(store: Experiments) -> None:
    settings = parse_settings([("error_rate", 0.05)], auto_promote=True)
    store.create("acme/support", "v1", [("v2", 50)], settings=settings)
    _interleaved(store, {"v1": {"score": 0.0}, "v2": {"score": 1.0}}, 5)
    assert store.enforce("acme/support") is None  # not enough ratings yet
    _interleaved(store, {"v1": {"score": 0.0}, "v2": {"score": 1.0}}, 5)
    _interleaved(store, {"v1": {"score": 1.0}, "v2": {"score": 1.0}}, 5)
    _interleaved(store, {"v1": {"score": 0.0}, "v2": {"score": 1.0}}, 20)
    decision = store.enforce("acme/support")
    assert decision is not None and decision["decision"] == "promote" and decision["variant"] == "v2"
    ended = store.report("acme/support")
    assert ended["status"] == "promoted" and ended["winner"] == "v2"
    assert ended["history"][-1]["by"] == "auto-promote"
    assert store.registry.resolve(parse_ref("acme/support:prod")).version == 2


def test_a_forced_sample_ratio_mismatch_marks_the_results_untrustworthy(store: Experiments) -> None:
    store.create("acme/support", "v1", [("v2", 50)], settings=parse_settings(auto_promote=True))
    _rows(store, "v1", 300, score=0.0)
    _rows(store, "v2", 100, score=1.0)  # a 50/50 split that served 300 / 100: assignment is broken
    report = store.report("acme/support")
    assert report["srm"]["mismatch"] and report["trustworthy"] is False
    assert report["verdict"].startswith("untrustworthy: sample ratio mismatch")
    assert store.enforce("acme/support") is None  # a win on broken assignment is not promoted
