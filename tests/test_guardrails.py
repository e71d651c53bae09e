"""An experiment's own rules on a real SQLite registry (and PostgreSQL for retention): guardrails
checked with the always-valid test, the live evaluators' scores per variant, rollback on a breach,
auto-promote on a win, retention that deletes old responses with the report unchanged, and the
settings refused with the reason."""

from __future__ import annotations

import itertools
import math
import random
import uuid
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.errors import NotFound
from adapterdeck.registry.experiments import ExperimentError, Experiments
from adapterdeck.registry.experiments.model import parse_guardrail, parse_retention, parse_settings
from adapterdeck.registry.refs import parse_ref

from .registry_helpers import claim_vllm, make_lora, postgres_database

TICKS = itertools.count()  # each recorded response a millisecond after the one before


@pytest.fixture(scope="module")
def lora_dirs(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("guard-adapters")
    return [claim_vllm(make_lora(base_model, root / f"a{i}", seed=60 + i), base_model) for i in range(2)]


def _store(home: Path, lora_dirs: list[Path], url: str | None = None) -> Experiments:
    registry = Registry(RegistrySettings(home=home, database_url=url))
    for path in lora_dirs:
        registry.publish(path, "acme/support")  # v1, v2
    registry.set_alias("acme/support", "prod", 1)
    return Experiments(registry)


@pytest.fixture
def store(tmp_path: Path, lora_dirs: list[Path]) -> Iterator[Experiments]:
    experiments = _store(tmp_path / "home", lora_dirs)
    yield experiments
    experiments.registry.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path, lora_dirs: list[Path]) -> Iterator[Experiments]:
    with postgres_database() if request.param == "postgresql" else nullcontext() as url:
        experiments = _store(tmp_path / "home", lora_dirs, url)
        yield experiments
        experiments.registry.close()


def _rows(store: Experiments, variant: str, n: int, *, status: int = 200, evals=None, score=None, **kw):
    """Record ``n`` served responses of ``variant`` of the running acme/support experiment
    (``shadow=1``: shadowed ones; ``at``: when, else now); their ids."""
    experiment = store.get("acme/support")
    rows = []
    for _ in range(n):
        rows.append(
            {
                "response_id": f"r-{uuid.uuid4().hex}",
                "experiment_id": experiment.id,
                "variant": variant,
                "shadow": kw.get("shadow", 0),
                "status": status,
                "latency_ms": kw.get("latency", 100),
                "prompt_tokens": 10,
                "completion_tokens": kw.get("tokens", 20),
                "output": None,
                "evals": evals,
                "score": score,
                "at": kw.get("at", datetime.now(UTC)) + timedelta(milliseconds=next(TICKS)),
            }
        )
    store.record(rows)
    return [r["response_id"] for r in rows]


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
        (lambda: parse_retention(max_age=-5), "must be above 0"),
        (lambda: parse_retention(max_age="-2d"), "must be above 0"),
        (lambda: parse_retention(max_age="a week"), "expected seconds or a duration"),
        (lambda: parse_retention(max_responses=-1), "a whole number >= 1"),
        (lambda: parse_retention(max_responses=2.5), "a whole number >= 1"),
        (lambda: parse_retention(max_responses="many"), "expected a number"),
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


# -- retention -------------------------------------------------------------------------------------


def _same(before: Any, after: Any, where: str = "report") -> None:
    """The two reports agree: the same keys and values, numbers up to rounding."""
    if isinstance(before, dict):
        assert isinstance(after, dict) and before.keys() == after.keys(), where
        for key in before:
            _same(before[key], after[key], f"{where}.{key}")
    elif isinstance(before, list):
        assert isinstance(after, list) and len(before) == len(after), where
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            _same(b, a, f"{where}[{i}]")
    elif isinstance(before, float) and isinstance(after, float) and math.isfinite(before):
        assert after == pytest.approx(before, rel=1e-9, abs=1e-12), where
    else:
        assert before == after, where


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    """A report without what pruning is meant to change: the pruning's own figures, the latency
    guardrail's p (the pruned prefix is one look), the timeline's places (by the minute), the
    shadow's recent outputs."""
    out = {k: v for k, v in report.items() if k not in ("pruned", "timeline")}
    out["shadow"] = {k: v for k, v in report["shadow"].items() if k != "recent_outputs"}
    out["guardrails"] = [{k: v for k, v in g.items() if g["metric"] != "latency_p95" or k not in ("p", "ci")}
                         for g in report["guardrails"]]  # fmt: skip
    return out


def _traffic(store: Experiments, rng: random.Random, n: int) -> None:
    """``n`` rounds of mixed traffic: both variants with ratings, errors, latencies, tokens and live
    scores, the shadow beside them; v2 a little better rated and a little worse on JSON."""
    for _ in range(n):
        for variant, up, valid in (("v1", 0.4, 0.95), ("v2", 0.6, 0.85)):
            _rows(
                store,
                variant,
                1,
                status=500 if rng.random() < 0.05 else 200,
                latency=rng.randint(80, 400),
                tokens=rng.randint(10, 40),
                score=float(rng.random() < up) if rng.random() < 0.6 else None,
                evals={"json_valid": float(rng.random() < valid)} if rng.random() < 0.8 else None,
            )
        _rows(store, "base", 1, shadow=1, latency=rng.randint(50, 90), evals={"json_valid": 0.0})


def test_retention_deletes_old_responses_and_the_report_stays_the_same(any_store: Experiments) -> None:
    store = any_store
    rails = [("error_rate", 0.05), ("completion_tokens", 0.5), ("latency_p95", 0.5), ("json_valid", 0.5)]
    settings = parse_settings(rails, retention=parse_retention(max_responses=150))
    store.create("acme/support", "v1", [("v2", 50)], shadow="base", settings=settings)
    rng = random.Random(5)
    _traffic(store, rng, 150)  # 450 responses, 300 served
    rated = [r for r in store.report("acme/support")["variants"] if r["feedback"]]
    assert len(rated) == 2
    later = datetime.now(UTC) + timedelta(minutes=5)  # every response past the grace period
    before = store.report("acme/support")
    with store.engine.connect() as conn:
        oldest = conn.execute(
            text("SELECT response_id FROM experiment_responses WHERE shadow = 0 ORDER BY at LIMIT 1")
        ).scalar()
    assert store.prune("acme/support", at=later) == 300
    after = store.report("acme/support")
    assert after["pruned"]["responses"] == 300 and before["pruned"] is None
    _same(_comparable(before), _comparable(after))
    seq = after["variants"][1]["vs_control"]["sequential"]
    assert seq["feedback_p"] is not None and seq["errors_ci"] is not None
    for name in ("v1", "v2"):  # the timeline holds the same requests, placed by the minute
        assert sum(before["timeline"]["variants"][name]["requests"]) == 150
        assert sum(after["timeline"]["variants"][name]["requests"]) == 150
    assert store.prune("acme/support", at=later) == 0  # nothing more to delete
    # A rating for a deleted response is refused as unknown; the kept ones still take ratings.
    with pytest.raises(NotFound):
        store.feedback(oldest, 1.0, "acme")

    # More traffic, a second pruning: the stored aggregates and the kept responses go on together.
    _traffic(store, rng, 100)
    before = store.report("acme/support")
    assert store.prune("acme/support", at=later + timedelta(minutes=5)) == 300
    after = store.report("acme/support")
    assert after["pruned"]["responses"] == 600
    _same(_comparable(before), _comparable(after))
    assert after["variants"][0]["requests"] == 250 and after["shadow"]["requests"] == 250
    latency = [g for g in after["guardrails"] if g["metric"] == "latency_p95"]
    assert (
        latency
        and latency[0]["control_value"]
        == next(g for g in before["guardrails"] if g["metric"] == "latency_p95")["control_value"]
    )


def test_retention_by_age_keeps_the_young_and_never_the_grace_period(store: Experiments) -> None:
    settings = parse_settings(retention=parse_retention(max_age="1h"))
    store.create("acme/support", "v1", [("v2", 50)], settings=settings)
    now = datetime.now(UTC)
    old = _rows(store, "v1", 30, at=now - timedelta(hours=2), score=1.0)
    young = _rows(store, "v2", 20, at=now - timedelta(minutes=30), score=0.0)
    assert store.prune("acme/support", at=now) == 30
    report = store.report("acme/support")
    assert [v["requests"] for v in report["variants"]] == [30, 20]
    assert [v["mean_score"] for v in report["variants"]] == [1.0, 0.0]
    with pytest.raises(NotFound):
        store.feedback(old[0], 0.0, None)
    assert store.feedback(young[0], 1.0, None)["variant"] == "v2"
    # A count of 1 still keeps every response of the last minute (gateways flush late, users rate).
    store.stop("acme/support")
    store.create("acme/support", "v1", [("v2", 50)], settings=parse_settings(
        retention=parse_retention(max_responses=1)))  # fmt: skip
    _rows(store, "v1", 10)
    assert store.prune("acme/support") == 0
    assert store.prune("acme/support", at=datetime.now(UTC) + timedelta(minutes=2)) == 9
