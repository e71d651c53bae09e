"""The A/B figures: always-valid p-values and intervals (mSPRT) that stay valid under peeking, the
fixed-horizon tests beside them, the sample ratio check and the verdict's wording. Pure Python."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from scipy import special, stats

from adapterdeck.registry.experiments.model import CANDIDATE, CONTROL, Experiment, Variant, rebalance
from adapterdeck.registry.experiments.sequential import ALPHA, sequential
from adapterdeck.registry.experiments.stats import SRM_SETTLE_SECONDS, Stats, compare, summarize

START = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
LOOKS = slice(49, None, 50)  # a look after every 50 ratings


def _log_choose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return special.gammaln(a + 1) - special.gammaln(b + 1) - special.gammaln(a - b + 1)


def _fisher(up_a: np.ndarray, n_a: np.ndarray, up_b: np.ndarray, n_b: np.ndarray) -> np.ndarray:
    """Fisher's exact test, two-sided as scipy defines it, for many 2x2 tables at once (scipy's
    takes about 2 ms a table): the hypergeometric chance of each count of b's ups given the margins,
    summed over the counts no likelier than the one observed."""
    n, ups, n_b = (n_a + n_b)[:, None], (up_a + up_b)[:, None], n_b[:, None]

    def pmf(k: np.ndarray) -> np.ndarray:
        inside = (k >= np.maximum(0, n_b + ups - n)) & (k <= np.minimum(n_b, ups))
        log = _log_choose(ups, k) + _log_choose(n - ups, n_b - k) - _log_choose(n, n_b)
        return np.where(inside, np.exp(np.where(inside, log, 0.0)), 0.0)

    every = pmf(np.arange(int(n.max()) + 1)[None, :])
    observed = pmf(up_b[:, None])
    return np.minimum(1.0, (every * (every <= observed * (1 + 1e-7))).sum(axis=1))


def _stream(
    rng: np.random.Generator, runs: int, n: int, rate_a: float, rate_b: float
) -> tuple[np.ndarray, ...]:
    """``runs`` experiments of ``n`` thumbs each in arrival order, split 50/50 at random."""
    arm = rng.random((runs, n)) < 0.5
    return arm, (rng.random((runs, n)) < np.where(arm, rate_b, rate_a)).astype(float)


def _compare(arm: np.ndarray, values: np.ndarray, k: int) -> dict[str, Any]:
    """compare() on the first ``k`` ratings of one experiment, their places known (as the report has)."""
    at = np.arange(k)
    a, v = arm[:k], values[:k]
    cand = Stats(scores=v[a].tolist(), score_at=at[a].tolist())
    return compare("v4", cand, "v3", Stats(scores=v[~a].tolist(), score_at=at[~a].tolist()))


def test_the_sequential_p_stays_valid_under_peeking_and_fishers_does_not() -> None:
    rng = np.random.default_rng(18)
    arm, values = _stream(rng, 500, 1000, 0.5, 0.5)  # A/A: no difference
    p = sequential(arm, values, binary=True)["p"]
    assert (np.diff(p, axis=1) <= 0).all()  # never rises as ratings come in
    sequential_fpr = (p[:, LOOKS] < ALPHA).any(axis=1).mean()
    n_b = np.cumsum(arm, axis=1)[:, LOOKS]
    up_b = np.cumsum(values * arm, axis=1)[:, LOOKS]
    up_a = np.cumsum(values, axis=1)[:, LOOKS] - up_b
    n_a = np.arange(50, 1001, 50)[None, :] - n_b
    fisher = _fisher(*(m.ravel() for m in (up_a, n_a, up_b, n_b))).reshape(n_b.shape)
    fisher_fpr = (fisher < ALPHA).any(axis=1).mean()
    final_fpr = (fisher[:, -1] < ALPHA).mean()
    # Stopping at the first look with p < 0.05: the sequential test stays within its 5%.
    assert sequential_fpr <= ALPHA + 0.015, sequential_fpr
    assert fisher_fpr >= 0.12 and fisher_fpr > 3 * sequential_fpr, (fisher_fpr, sequential_fpr)
    assert final_fpr <= ALPHA + 0.02, final_fpr  # Fisher read once is fine
    # Those are the figures compare() gives the dashboard, look by look.
    for run in range(3):
        for look, k in enumerate(range(50, 1001, 150)):
            result = _compare(arm[run], values[run], k)
            assert result["sequential"]["feedback_p"] == pytest.approx(p[run, k - 1], rel=1e-9)
            assert result["feedback_p"] == pytest.approx(fisher[run, 3 * look], rel=1e-6)


def test_the_vectorised_fisher_is_scipys() -> None:
    rng = np.random.default_rng(1)
    n_a, n_b = rng.integers(10, 300, 40), rng.integers(10, 300, 40)
    up_a, up_b = rng.binomial(n_a, 0.4), rng.binomial(n_b, 0.5)
    ours = _fisher(up_a, n_a, up_b, n_b)
    for i in range(40):
        table = [[up_b[i], n_b[i] - up_b[i]], [up_a[i], n_a[i] - up_a[i]]]
        assert ours[i] == pytest.approx(stats.fisher_exact(table).pvalue, rel=1e-6)


def test_scores_and_error_rates_stay_valid_under_peeking_too() -> None:
    rng = np.random.default_rng(7)
    stars = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], size=(500, 1000), p=[0.05, 0.05, 0.1, 0.3, 0.5])
    p = sequential(rng.random((500, 1000)) < 0.5, stars, binary=False)["p"]
    assert (p[:, -1] < ALPHA).mean() <= ALPHA + 0.015
    errors = (rng.random((500, 2000)) < 0.03).astype(float)
    p = sequential(rng.random((500, 2000)) < 0.5, errors, binary=True)["p"]
    assert (p[:, -1] < ALPHA).mean() <= ALPHA + 0.015


def test_a_large_difference_is_found_quickly() -> None:
    arm, values = _stream(np.random.default_rng(3), 200, 400, 0.3, 0.6)
    p = sequential(arm, values, binary=True)["p"]
    assert (p[:, -1] < ALPHA).mean() >= 0.95  # by 400 ratings
    assert _compare(arm[0], values[0], 400)["verdict"].startswith("v4 better than v3, p")


def test_the_interval_holds_the_true_difference_at_every_look_and_shrinks() -> None:
    arm, values = _stream(np.random.default_rng(5), 400, 3000, 0.5, 0.6)
    run = sequential(arm, values, binary=True)
    low, high = run["low"], run["high"]
    # The interval is a confidence sequence: the truth inside it at every look at once.
    covered = ((low <= 0.1) & (high >= 0.1)).all(axis=1).mean()
    assert covered >= 1 - ALPHA - 0.015, covered
    width = np.median(high - low, axis=0)
    assert width[199] > width[999] > width[2999] and width[2999] < 0.2, width[[199, 999, 2999]]
    # p < 0.05 exactly when the interval leaves out 0.
    assert ((run["p"] < ALPHA) == ((low > 0) | (high < 0))).mean() > 0.99


def _ratings(up: int, n: int) -> Stats:
    return Stats(scores=[1.0] * up + [0.0] * (n - up), requests=n)


def test_the_verdict_keeps_its_wording_and_rests_on_the_sequential_p() -> None:
    better = compare("v4", _ratings(40, 50), "v3", _ratings(15, 50))
    assert better["verdict"] == "v4 better than v3, p<0.001"
    assert better["sequential"]["method"] == "msprt" and better["sequential"]["feedback_ci"][0] > 0
    worse = compare("v4", _ratings(8, 36), "v3", _ratings(19, 24))
    assert worse["verdict"].startswith("v4 worse than v3, p=0.0"), worse["verdict"]
    same = compare("v4", _ratings(20, 40), "v3", _ratings(22, 40))
    assert same["verdict"] == "no significant difference between v4 and v3, p=1"  # Lambda below 1
    few = compare("v4", _ratings(5, 5), "v3", _ratings(3, 12))
    assert few["verdict"] == "not enough data (v4: 5 ratings, v3: 12; a verdict needs 10 each)"
    assert few["sequential"]["feedback_p"] is None and few["feedback_p"] is None
    # Fisher read once says significant; the always-valid p does not (yet).
    early = compare("v4", _ratings(30, 50), "v3", _ratings(19, 50))
    assert early["feedback_test"] == "fisher_exact" and early["feedback_p"] < ALPHA
    assert early["fixed_horizon"]["feedback_p"] == early["feedback_p"]
    assert (
        early["verdict"].startswith("no significant difference") and early["sequential"]["feedback_p"] > ALPHA
    )
    errors = compare("v4", Stats(requests=200, errors=40), "v3", Stats(requests=200, errors=1))
    assert errors["verdict"].endswith("; v4 has more errors, p<0.001") and errors["errors_p"] < 0.001
    assert errors["sequential"]["errors_ci"][0] > 0
    fewer = compare("v4", Stats(requests=300, errors=0), "v3", Stats(requests=300, errors=30))
    assert "v4 has fewer errors, p<0.001" in fewer["verdict"]
    scores = compare("v4", Stats(scores=[2.0, 2.5, 3.0] * 10), "v3", Stats(scores=[4.0, 4.5, 5.0] * 10))
    assert scores["feedback_test"] == "welch_t" and scores["verdict"].startswith("v4 worse than v3, p<0.001")


def _experiment(
    weights: dict[str, float], ended: bool = False, changed: datetime | None = None
) -> Experiment:
    names = list(weights)
    variants = [Variant(names[0], f"acme/support@{names[0][1:]}", CONTROL)]
    variants += [Variant(n, f"acme/support@{n[1:]}", CANDIDATE, w) for n, w in list(weights.items())[1:]]
    rebalance(variants)
    at = START.isoformat()
    updated = (changed or START).isoformat()
    status, end = ("stopped", updated) if ended else ("running", None)
    return Experiment(1, "acme/support", status, variants, None, None, "cli", at, updated, end)


def _rows(counts: dict[str, int], start: datetime = START, up: dict[str, float] | None = None) -> list[Any]:
    """Served requests interleaved at random, one a second from ``start``; thumbs up at ``up``'s rate."""
    order = [name for name, n in counts.items() for _ in range(n)]
    rng = random.Random(len(order))
    rng.shuffle(order)
    rows = []
    for i, name in enumerate(order):
        score = float(rng.random() < up[name]) if up else None
        at = start + timedelta(seconds=i)
        rows.append(SimpleNamespace(variant=name, shadow=0, status=200, latency_ms=20, prompt_tokens=5,
                                    completion_tokens=3, score=score, at=at))  # fmt: skip
    return rows


def test_a_sample_ratio_mismatch_makes_the_experiment_untrustworthy() -> None:
    experiment = _experiment({"v3": 50, "v4": 50})
    report = summarize(experiment, _rows({"v3": 700, "v4": 300}, up={"v3": 0.5, "v4": 0.7}), [])
    srm = report["srm"]
    assert srm["mismatch"] and srm["p"] < 0.001 and report["trustworthy"] is False
    assert srm["observed"] == {"v3": 700, "v4": 300} and srm["expected"] == {"v3": 500.0, "v4": 500.0}
    reason = "sample ratio mismatch (v3 700 requests for weight 50%, v4 300 requests for weight 50%, p<0.001)"
    assert report["untrustworthy_reason"] == reason
    assert report["verdict"].startswith(f"untrustworthy: {reason}; v4 better than v3, p")
    fair = summarize(experiment, _rows({"v3": 510, "v4": 490}, up={"v3": 0.5, "v4": 0.5}), [])
    assert not fair["srm"]["mismatch"] and fair["srm"]["p"] > 0.1 and fair["trustworthy"] is True
    assert fair["verdict"].startswith("no significant difference") and fair["untrustworthy_reason"] is None


def test_a_variant_of_weight_zero_that_served_requests_is_a_mismatch() -> None:
    report = summarize(_experiment({"v3": 70, "v4": 30, "v5": 0}), _rows({"v3": 70, "v4": 30, "v5": 4}), [])
    assert report["srm"]["p"] == 0.0 and report["srm"]["mismatch"] and not report["trustworthy"]
    assert "v5 4 requests for weight 0%" in report["untrustworthy_reason"]
    quiet = summarize(_experiment({"v3": 70, "v4": 30, "v5": 0}), _rows({"v3": 72, "v4": 28}), [])
    assert quiet["srm"]["p"] > 0.1 and quiet["trustworthy"]


def test_the_split_is_checked_only_on_enough_traffic_since_the_weights_were_set() -> None:
    few = summarize(_experiment({"v3": 50, "v4": 50}), _rows({"v3": 15, "v4": 1}), [])
    assert few["srm"]["p"] is None and not few["srm"]["mismatch"] and few["trustworthy"]
    alone = summarize(_experiment({"v3": 100, "v4": 0}), _rows({"v3": 50}), [])
    assert alone["srm"]["p"] is None and alone["trustworthy"]
    # 90/10 for an hour, then set to 50/50: only what came after the change is tested.
    changed = START + timedelta(hours=1)
    rows = _rows({"v3": 900, "v4": 100}) + _rows({"v3": 200, "v4": 210}, changed + timedelta(seconds=1))
    report = summarize(_experiment({"v3": 50, "v4": 50}, changed=changed), rows, [])
    settled = changed + timedelta(seconds=SRM_SETTLE_SECONDS)
    assert report["srm"]["since"] == settled.isoformat() and report["trustworthy"]
    assert sum(report["srm"]["observed"].values()) == 410 - SRM_SETTLE_SECONDS + 1
    # Ended, the last change is known only from the history.
    ended = _experiment({"v3": 50, "v4": 50}, ended=True, changed=changed + timedelta(hours=2))
    assert summarize(ended, rows, [])["srm"]["p"] is None
    history = [
        {"action": "create", "at": START.isoformat()},
        {"action": "set-weight", "at": changed.isoformat()},
    ]
    assert summarize(ended, rows, [], history=history)["srm"]["p"] > 0.1
    assert summarize(ended, rows, [], history=history[:1])["srm"]["mismatch"]  # 90/10 against 50/50


def test_the_report_reads_the_responses_in_time_order() -> None:
    rows = _rows({"v3": 300, "v4": 300}, up={"v3": 0.5, "v4": 0.6})
    experiment = _experiment({"v3": 50, "v4": 50})
    ordered = summarize(experiment, rows, [])
    shuffled = summarize(experiment, random.Random(0).sample(rows, len(rows)), [])
    assert shuffled["variants"][1]["vs_control"] == ordered["variants"][1]["vs_control"]
    seq = ordered["variants"][1]["vs_control"]["sequential"]
    arm = np.array([r.variant == "v4" for r in rows])
    run = sequential(arm, np.array([r.score for r in rows]), binary=True)
    assert seq["feedback_p"] == pytest.approx(run["p"][-1]) and seq["feedback_ci"][0] == pytest.approx(
        run["low"][-1]
    )
