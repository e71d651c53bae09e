"""An experiment's figures: each variant summed up, and each candidate tested against the control.

How to read them (each candidate's ``vs_control``; a difference is candidate minus control):

- ``sequential`` (what the verdict rests on): always-valid p-values and confidence intervals for
  the difference in mean rating (``feedback_p``, ``feedback_ci``) and in error rate (``errors_p``,
  ``errors_ci``). They stay valid however often they are looked at: stopping at the first look with
  p < 0.05 is wrong at most 5% of the times there is no difference, and the true difference lies
  in the 95% interval at every look in at least 95% of experiments. p never rises and the interval
  never widens as data comes in; p is often exactly 1 (data that favours no difference); the
  price is that a difference takes more ratings to show.
- ``feedback_test``, ``feedback_p``, ``errors_p`` (also under ``fixed_horizon``): Fisher's exact
  test (ratings that are all thumbs up or down, and the error rate) or Welch's t-test (other
  scores). Valid only when read once, at a sample size fixed in advance; stopping at the first
  p < 0.05 turns their 5% false positives into 14% with 5 looks, 39% with 100 (bench/ab_peeking.py).
- ``srm``: whether the served requests split as the weights say (chi-square goodness of fit, since
  the weights were last set). A mismatch (p < ``SRM_ALPHA``) means the assignment or the recording
  is broken, and then no comparison is trustworthy (``trustworthy: false``).

The sequential test itself (the mSPRT, its method and its reference) is in ``sequential.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from adapterdeck.registry.db import utc
from adapterdeck.registry.experiments.model import CANDIDATE, Experiment
from adapterdeck.registry.experiments.sequential import (
    ALPHA,
    MIN_SAMPLES,
    TAU,
    Moments,
    Run,
    always_valid,
)

if TYPE_CHECKING:
    from adapterdeck.registry.experiments.retention import Pruned

TIMELINE_BUCKETS = 24  # points of an experiment's timeline (the dashboard's charts)
# Sample ratio mismatch: below this p the split is broken; the test needs SRM_MIN_REQUESTS.
SRM_ALPHA = 0.001
SRM_MIN_REQUESTS = 20
SRM_SETTLE_SECONDS = 10  # after a weight change, while every gateway picks up the new split


def summarize(
    experiment: Experiment,
    rows: Iterable[Any],
    shadow_outputs: list[str],
    history: Sequence[dict[str, Any]] | None = None,
    pruned: Pruned | None = None,
) -> dict[str, Any]:
    """The experiment with each variant's figures side by side, candidates tested against the
    control, the sample ratio check and a verdict; ``rows`` are its recorded responses, ``history``
    its events (when the weights were last set; without it, the experiment's ``updated_at``),
    ``pruned`` what retention kept of the responses it deleted (``retention.py``)."""
    rows = sorted(rows, key=_time)  # the sequential figures read the responses in time order
    stats = {v.name: Stats() for v in experiment.variants}
    shadow_stats = Stats()
    if pruned is not None:
        for name, st in stats.items():
            pruned.seed(st, pruned.variants.get(name))
        if experiment.shadow:
            pruned.seed(shadow_stats, pruned.shadow.get(experiment.shadow.name))
    served = 0
    for row in rows:
        if row.shadow:
            shadow_stats.add(row)
        elif row.variant in stats:
            stats[row.variant].add(row, served)
            served += 1
    control = stats[experiment.control.name]
    variants = []
    for v in experiment.variants:
        entry = {
            "name": v.name,
            "ref": v.ref,
            "role": v.role,
            "weight": v.weight,
            **stats[v.name].summary(),
        }
        if v.role == CANDIDATE:
            runs = pruned.runs.get(v.name) if pruned is not None else None
            entry["vs_control"] = compare(v.name, stats[v.name], experiment.control.name, control, runs)
        variants.append(entry)
    out = experiment.to_dict()
    out["variants"] = variants
    if experiment.shadow:
        out["shadow"] = {
            "name": experiment.shadow.name,
            "ref": experiment.shadow.ref,
            **shadow_stats.summary(),
            "recent_outputs": shadow_outputs,
        }
    out["srm"] = srm = sample_ratio(experiment, rows, history, pruned)
    out["trustworthy"] = not srm["mismatch"]
    out["untrustworthy_reason"] = srm["reason"] if srm["mismatch"] else None
    verdicts = [e["vs_control"]["verdict"] for e in variants if "vs_control" in e]
    out["verdict"] = "; ".join([f"untrustworthy: {srm['reason']}"] * srm["mismatch"] + verdicts)
    out["timeline"] = timeline([v.name for v in experiment.variants], rows, pruned=pruned)
    out["pruned"] = pruned.describe() if pruned is not None else None
    return out


def _time(row: Any) -> float:
    return utc(row.at).timestamp()


def weights_set_at(experiment: Experiment, history: Sequence[dict[str, Any]] | None) -> datetime | None:
    """When the weights were last set, plus the time to settle after a change; None: not known."""
    if history:
        changes = [e for e in history if e.get("action") in ("create", "set-weight")]
        if changes:
            at = utc(datetime.fromisoformat(changes[-1]["at"]))
            return at + timedelta(seconds=SRM_SETTLE_SECONDS * (changes[-1]["action"] != "create"))
    if experiment.ended_at is not None:  # ending updates updated_at too: the last change is lost
        return None
    at = utc(datetime.fromisoformat(experiment.updated_at))
    return at + timedelta(seconds=SRM_SETTLE_SECONDS * (experiment.updated_at != experiment.created_at))


def sample_ratio(
    experiment: Experiment,
    rows: Iterable[Any],
    history: Sequence[dict[str, Any]] | None = None,
    pruned: Pruned | None = None,
) -> dict[str, Any]:
    """Do the served requests since the weights were last set split as the weights say?

    A chi-square goodness-of-fit test of each variant's requests against its share of the buckets
    (its weight, rounded to the 10,000 buckets); a variant of weight 0 that served requests is a
    mismatch (p 0). Skipped (p None) below ``SRM_MIN_REQUESTS`` requests, with a single variant of
    weight above 0, or when the experiment has ended and ``history`` does not say when the weights
    were last set."""
    from scipy import stats

    since = weights_set_at(experiment, history)
    by_buckets = any(v.share for v in experiment.variants)
    shares = {v.name: float(v.share if by_buckets else v.weight) for v in experiment.variants}
    observed = dict.fromkeys(shares, 0)
    for row in rows:
        if not row.shadow and row.variant in observed and (since is None or utc(row.at) >= since):
            observed[row.variant] += 1
    if pruned is not None and since is not None and pruned.srm_since == since.isoformat():
        for name, k in pruned.srm_counts.items():
            if name in observed:
                observed[name] += k
    total, weights = sum(observed.values()), sum(shares.values())
    expected = {n: total * s / weights if weights else 0.0 for n, s in shares.items()}
    out: dict[str, Any] = {"p": None, "observed": observed, "expected": expected, "mismatch": False}
    out.update(since=since.isoformat() if since else None, note=None)
    stray = [n for n, s in shares.items() if s == 0 and observed[n]]
    live = [n for n, s in shares.items() if s > 0]
    if since is None:
        out["note"] = "the experiment has ended and when its weights were last set is not known"
    elif total < SRM_MIN_REQUESTS:
        out["note"] = f"{total} requests since the weights were set; the test needs {SRM_MIN_REQUESTS}"
    elif stray:
        out["p"] = 0.0
    elif len(live) < 2:
        out["note"] = "a single variant has a weight above 0"
    else:
        test = stats.chisquare([observed[n] for n in live], [expected[n] for n in live])
        out["p"] = float(test.pvalue)
    out["mismatch"] = out["p"] is not None and out["p"] < SRM_ALPHA
    weight = {v.name: v.weight for v in experiment.variants}
    split = ", ".join(f"{n} {observed[n]} requests for weight {weight[n]:g}%" for n in shares)
    out["reason"] = f"sample ratio mismatch ({split}, {_p(out['p'])})" if out["mismatch"] else None
    return out


def timeline(
    names: list[str],
    rows: Iterable[Any],
    buckets: int = TIMELINE_BUCKETS,
    pruned: Pruned | None = None,
) -> dict[str, Any]:
    """The served requests (not the shadow's) in ``buckets`` equal spans of time from the first to
    the last: per variant, requests, how many of them were rated, and their mean score (None:
    none rated). ``pruned``: the deleted responses, placed by the start of their minute (or hour)."""
    # (when, variant, requests, rated, sum of scores)
    served = [
        (utc(r.at).timestamp(), r.variant, 1, int(r.score is not None), r.score or 0.0)
        for r in rows
        if not r.shadow and r.variant in names
    ]
    if pruned is not None:
        served += [p for p in pruned.timeline_points() if p[1] in names]
    if not served:
        return {"start": [], "variants": {n: {"requests": [], "rated": [], "mean_score": []} for n in names}}
    first = min(p[0] for p in served)
    span = max(max(p[0] for p in served) - first, 1.0)
    count = {n: [0] * buckets for n in names}
    scored = {n: [[0.0, 0] for _ in range(buckets)] for n in names}
    for at, variant, requests, rated, total in served:
        i = min(buckets - 1, int((at - first) / span * buckets))
        count[variant][i] += requests
        scored[variant][i][0] += total
        scored[variant][i][1] += rated
    return {
        "start": [round(first + i * span / buckets, 3) for i in range(buckets)],
        "variants": {
            n: {
                "requests": count[n],
                "rated": [k for _, k in scored[n]],
                "mean_score": [round(s / k, 4) if k else None for s, k in scored[n]],
            }
            for n in names
        },
    }


@dataclass
class Stats:
    """One variant's recorded requests, summed up; ``request_at`` and ``score_at`` place each
    request and each score in the experiment's served requests in time order (empty: not known,
    and the sequential figures read only the totals)."""

    requests: int = 0
    errors: int = 0
    latencies: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    scores: list[float] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)  # 1 for each request that was an error
    request_at: list[int] = field(default_factory=list)
    score_at: list[int] = field(default_factory=list)
    # What retention pruned (counted in the totals above): requests, their latencies ({ms: count})
    # and their ratings; ``latencies`` and ``scores`` hold only the responses still kept.
    pruned: int = 0
    pruned_latency: dict[int, int] = field(default_factory=dict)
    pruned_scores: Moments = field(default_factory=Moments)

    @property
    def ratings(self) -> Moments:
        """Every rating, pruned or kept."""
        return self.pruned_scores.merged(Moments.of(self.scores))

    def add(self, row: Any, at: int | None = None) -> None:
        self.requests += 1
        self.errors += int(row.status >= 500)
        self.latencies.append(row.latency_ms)
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        if at is not None:
            self.failed.append(int(row.status >= 500))
            self.request_at.append(at)
        if row.score is not None:
            self.scores.append(row.score)
            if at is not None:
                self.score_at.append(at)

    def summary(self) -> dict[str, Any]:
        def pct(q: float) -> float | None:
            if not self.latencies and not self.pruned_latency:
                return None
            return quantile(self.latencies, q, self.pruned_latency)

        ratings = self.ratings
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 4) if self.requests else None,
            "latency_ms_p50": pct(0.5),
            "latency_ms_p95": pct(0.95),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "feedback": ratings.n,
            "mean_score": round(ratings.total / ratings.n, 4) if ratings.n else None,
        }


def quantile(values: Sequence[float], q: float, counts: dict[Any, int] | None = None) -> float:
    """The ``q`` quantile of ``values`` and of the values counted in ``counts`` ({value: how
    many}), not all empty: the value at rank ``int(q * n)``."""
    if not counts:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    tally: dict[float, int] = {}
    for x in values:
        tally[x] = tally.get(x, 0) + 1
    for x, k in counts.items():
        tally[x] = tally.get(x, 0) + k
    rank = min(sum(tally.values()) - 1, int(q * sum(tally.values())))
    for x in sorted(tally):
        rank -= tally[x]
        if rank < 0:
            return x
    raise AssertionError("unreachable")


def _p(value: float) -> str:
    return f"p={value:.2g}" if value >= 0.001 else "p<0.001"


def _direction(p: float, ci: list[float] | None, diff: float) -> bool:
    """Whether the candidate is above the control: the side of 0 the interval lies on."""
    if ci is not None and (ci[0] > 0 or ci[1] < 0):
        return ci[0] > 0
    return diff > 0


def compare(
    name: str, cand: Stats, control_name: str, control: Stats, runs: dict[str, Run] | None = None
) -> dict[str, Any]:
    """Test a candidate against the control: feedback first, then the error rate. The verdict
    rests on the sequential figures; the fixed-horizon ones stay beside them. ``runs``: where the
    candidate's ``score`` and ``error_rate`` streams stood after the responses retention pruned."""
    from scipy import stats

    runs = runs or {}
    out: dict[str, Any] = {"feedback_test": None, "feedback_p": None, "errors_p": None}
    seq: dict[str, Any] = {"feedback_p": None, "feedback_ci": None, "feedback_diff": None}
    seq.update(errors_p=None, errors_ci=None, errors_diff=None, method="msprt", tau=TAU, alpha=ALPHA)
    verdicts = []
    mine, theirs = cand.ratings, control.ratings
    if mine.n >= MIN_SAMPLES and theirs.n >= MIN_SAMPLES:
        binary = mine.nonbinary == 0 and theirs.nonbinary == 0
        if binary:
            up_c, up_k = round(mine.total), round(theirs.total)
            table = [[up_c, mine.n - up_c], [up_k, theirs.n - up_k]]
            p = float(stats.fisher_exact(table).pvalue)
            out["feedback_test"] = "fisher_exact"
        elif mine.low == mine.high == theirs.low == theirs.high:
            p = 1.0
            out["feedback_test"] = "welch_t"
        else:
            test = stats.ttest_ind_from_stats(
                mine.mean, mine.sd, mine.n, theirs.mean, theirs.sd, theirs.n, equal_var=False
            )
            p = float(test.pvalue)
            out["feedback_test"] = "welch_t"
        out["feedback_p"] = 1.0 if math.isnan(p) else p
        p, ci, diff = always_valid(
            control.scores, control.score_at, cand.scores, cand.score_at, binary, runs.get("score")
        )
        seq.update(feedback_p=p, feedback_ci=ci, feedback_diff=diff)
        if p < ALPHA:
            better = _direction(p, ci, diff)
            verdicts.append(f"{name} {'better' if better else 'worse'} than {control_name}, {_p(p)}")
        else:
            verdicts.append(f"no significant difference between {name} and {control_name}, {_p(p)}")
    else:
        verdicts.append(
            f"not enough data ({name}: {mine.n} ratings, {control_name}: "
            f"{theirs.n}; a verdict needs {MIN_SAMPLES} each)"
        )
    if cand.requests >= MIN_SAMPLES and control.requests >= MIN_SAMPLES and (cand.errors or control.errors):
        table = [
            [cand.errors, cand.requests - cand.errors],
            [control.errors, control.requests - control.errors],
        ]
        out["errors_p"] = float(stats.fisher_exact(table).pvalue)
        known = (
            len(cand.failed) + cand.pruned == cand.requests
            and len(control.failed) + control.pruned == control.requests
        )
        flags_c = cand.failed if known else [1.0] * cand.errors + [0.0] * (cand.requests - cand.errors)
        flags_k = (
            control.failed if known else [1.0] * control.errors + [0.0] * (control.requests - control.errors)
        )
        start = runs.get("error_rate") if known else None
        p, ci, diff = always_valid(flags_k, control.request_at, flags_c, cand.request_at, True, start)
        seq.update(errors_p=p, errors_ci=ci, errors_diff=diff)
        if p < ALPHA:
            verdicts.append(f"{name} has {'more' if _direction(p, ci, diff) else 'fewer'} errors, {_p(p)}")
    out["fixed_horizon"] = {k: out[k] for k in ("feedback_test", "feedback_p", "errors_p")}
    out["sequential"] = seq
    out["verdict"] = "; ".join(verdicts)
    return out
