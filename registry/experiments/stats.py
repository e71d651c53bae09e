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

The sequential test is the mixture sequential probability ratio test (mSPRT) of Johari, Koomen,
Pekelis & Walsh, "Always Valid Inference: Continuous Monitoring of A/B Tests", Operations Research
70(3):1806-1821, 2022 (Optimizely's Stats Engine), in closed form with numpy (the ``confseq``
package has no wheel for Python 3.11): a normal mixing prior N(0, (tau * sd)^2) on the difference of
means, the two-sample normal approximation with the pooled variance sd^2 (within the two sides, as
the equal-variance t-test's; of all the ratings together when each side's are all equal). With n_a
and n_b ratings, h = 1/n_a + 1/n_b, the difference d and z^2 = (d - theta)^2 / (sd^2 h), the
likelihood ratio is

    Lambda_n(theta) = sqrt(h / (h + tau^2)) * exp(tau^2 z^2 / (2 (h + tau^2)))

and p_n = min(1, 1 / Lambda_n(0)); the interval is {theta : Lambda_n(theta) < 1/alpha}, that is
d +- sd sqrt(2 h (h + tau^2) / tau^2 * (log(1/alpha) + log((h + tau^2) / h) / 2)). By Ville's
inequality, under no difference the chance that Lambda ever reaches 1/alpha is at most alpha, so p
is valid at any stopping time whoever chooses it, and so is its running minimum (the paper's
always-valid p-value). Having only the current data, the figures are taken over its own prefixes:
the responses in time order, p the minimum over every prefix and the interval the intersection of
theirs, as if someone had looked after every response. A prefix counts once each side has
``MIN_SAMPLES`` and, for thumbs and errors, each of the four cells expects ``MIN_EXPECTED``. With
the variance estimated and the normal approximation, the validity is asymptotic; simulated A/A tests
(tests/test_ab_stats.py, bench/ab_peeking.py) stay under 5%.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from adapterdeck.registry.db import utc
from adapterdeck.registry.experiments.model import CANDIDATE, Experiment

if TYPE_CHECKING:
    import numpy as np

    from adapterdeck.registry.experiments.retention import Pruned

TIMELINE_BUCKETS = 24  # points of an experiment's timeline (the dashboard's charts)
# A verdict needs this many ratings (or requests, for the error rate) on each side.
MIN_SAMPLES = 10
ALPHA = 0.05
# The mixing prior's standard deviation, in standard deviations of the ratings (Cohen's d): tau =
# 0.2, Cohen's "small" effect, set to the effect size of interest (Optimizely-style): 10 points of
# thumbs-up rate around 50%. Any tau keeps p valid; it only moves where the power is. Simulated
# (bench/ab_peeking.py), a 5-point lift on 50% is found by 5,000 ratings 80% of the time with tau
# 0.1, 77% with 0.2 and 74% with 0.3; but the large differences between adapter versions that a
# small tenant's traffic shows need 0.2: 36 ratings 22% up against 24 79% up give p=0.01 (p=0.2
# with tau 0.1).
TAU = 0.2
# Thumbs and errors: the normal approximation needs this many expected in each cell of the 2x2 table.
MIN_EXPECTED = 5
# Sample ratio mismatch: below this p the split is broken; the test needs SRM_MIN_REQUESTS.
SRM_ALPHA = 0.001
SRM_MIN_REQUESTS = 20
SRM_SETTLE_SECONDS = 10  # after a weight change, while every gateway picks up the new split

INF = math.inf


def _num(x: float | None) -> float | None:
    """JSON holds no infinities (PostgreSQL refuses them): None stands for one."""
    return x if x is None or math.isfinite(x) else None


@dataclass
class Moments:
    """Sufficient statistics of some numbers: count, sum, sum of squares, least, greatest, and how
    many were neither 0 nor 1 (none: they are thumbs or flags)."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0
    low: float | None = None
    high: float | None = None
    nonbinary: int = 0

    @classmethod
    def of(cls, values: Iterable[float]) -> Moments:
        out = cls()
        for x in values:
            out.add(x)
        return out

    def add(self, x: float, count: int = 1) -> None:
        x = float(x)
        self.n += count
        self.total += x * count
        self.squares += x * x * count
        self.low = x if self.low is None else min(self.low, x)
        self.high = x if self.high is None else max(self.high, x)
        self.nonbinary += count * (x not in (0.0, 1.0))

    def merged(self, other: Moments) -> Moments:
        lows = [x for x in (self.low, other.low) if x is not None]
        highs = [x for x in (self.high, other.high) if x is not None]
        return Moments(
            self.n + other.n,
            self.total + other.total,
            self.squares + other.squares,
            min(lows) if lows else None,
            max(highs) if highs else None,
            self.nonbinary + other.nonbinary,
        )

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def sd(self) -> float:
        """The sample standard deviation (n - 1)."""
        if self.n < 2:
            return 0.0
        return math.sqrt(max(self.squares - self.total**2 / self.n, 0.0) / (self.n - 1))

    def to_list(self) -> list[Any]:
        return [self.n, self.total, self.squares, self.low, self.high, self.nonbinary]

    @classmethod
    def from_list(cls, data: Sequence[Any] | None) -> Moments:
        return cls(*data) if data else cls()


MODES = {"binary": True, "real": False}


@dataclass
class Run:
    """Where one always-valid stream (a candidate against the control on one metric) stood after a
    prefix of its observations, so that the stream can go on without them (retention): each side's
    ``Moments`` and, read as 0/1 values (``binary``) and as real ones (``real``), the running minimum
    of p and the running intersection [low, high] of the intervals."""

    control: Moments = field(default_factory=Moments)
    candidate: Moments = field(default_factory=Moments)
    looks: dict[str, list[float]] = field(default_factory=lambda: {m: [1.0, -INF, INF] for m in MODES})

    @classmethod
    def once(cls, control: Moments, candidate: Moments) -> Run:
        """A stream known only by its totals: one look, at its end."""
        run = cls(control, candidate)
        for mode, binary in MODES.items():
            p, low, high, _ = msprt(*_sides(control, candidate), binary=binary)
            run.looks[mode] = [float(p), float(low), float(high)]
        return run

    def advance(self, arm: Sequence[bool], values: Sequence[float]) -> Run:
        """The stream after ``values`` more observations (``arm`` True: the candidate's)."""
        if not len(values):
            return self
        import numpy as np

        arm_, values_ = np.asarray(arm, dtype=bool), np.asarray(values, dtype=float)
        looks = {}
        for mode, binary in MODES.items():
            run = sequential(arm_, values_, binary=binary, start=self)
            looks[mode] = [float(run["p"][-1]), float(run["run_low"][-1]), float(run["run_high"][-1])]
        return Run(
            self.control.merged(Moments.of(values_[~arm_])),
            self.candidate.merged(Moments.of(values_[arm_])),
            looks,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "control": self.control.to_list(),
            "candidate": self.candidate.to_list(),
            "looks": {m: [_num(x) for x in look] for m, look in self.looks.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Run:
        bounds = (1.0, -INF, INF)
        return cls(
            Moments.from_list(data["control"]),
            Moments.from_list(data["candidate"]),
            {
                m: [bounds[i] if x is None else x for i, x in enumerate(look)]
                for m, look in data["looks"].items()
            },
        )


def _sides(control: Moments, candidate: Moments) -> tuple[float, ...]:
    return (control.n, control.total, control.squares, candidate.n, candidate.total, candidate.squares)


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


def msprt(
    n_a: Any,
    sum_a: Any,
    sq_a: Any,
    n_b: Any,
    sum_b: Any,
    sq_b: Any,
    *,
    binary: bool,
    tau: float = TAU,
    alpha: float = ALPHA,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The mSPRT of b against a from each side's count, sum and sum of squares (arrays of any one
    shape, element by element): (p, low, high, difference), the difference b - a. Where the data
    cannot be tested (fewer than ``MIN_SAMPLES`` a side, too few expected in a cell, no variance),
    p is 1 and the interval (-inf, inf)."""
    import numpy as np

    n_a, sum_a, sq_a, n_b, sum_b, sq_b = (
        np.asarray(x, dtype=float) for x in (n_a, sum_a, sq_a, n_b, sum_b, sq_b)
    )
    ok = (n_a >= MIN_SAMPLES) & (n_b >= MIN_SAMPLES)
    n_a, n_b = np.maximum(n_a, 1.0), np.maximum(n_b, 1.0)
    mean_a, mean_b, n = sum_a / n_a, sum_b / n_b, n_a + n_b
    within = np.maximum(sq_a - n_a * mean_a**2 + sq_b - n_b * mean_b**2, 0.0) / np.maximum(n - 2, 1.0)
    pooled = (sum_a + sum_b) / n
    overall = np.maximum((sq_a + sq_b) / n - pooled**2, 0.0)  # when each side's ratings are all equal
    var = np.where(within > 1e-12 * np.maximum(overall, 1e-300), within, overall)
    ok &= var > 1e-12 * np.maximum(1.0, np.abs(pooled)) ** 2
    if binary:
        ok &= np.minimum(n_a, n_b) * np.minimum(pooled, 1 - pooled) >= MIN_EXPECTED
    var = np.where(ok, var, 1.0)
    diff, h, t2 = mean_b - mean_a, 1 / n_a + 1 / n_b, tau**2
    log_lambda = 0.5 * np.log(h / (h + t2)) + t2 * diff**2 / (var * h) / (2 * (h + t2))
    p = np.where(ok, np.exp(-np.maximum(log_lambda, 0.0)), 1.0)
    radius = np.sqrt(var * 2 * h * (h + t2) / t2 * (math.log(1 / alpha) + 0.5 * np.log((h + t2) / h)))
    radius = np.where(ok, radius, np.inf)
    return p, diff - radius, diff + radius, diff


def sequential(
    arm: Any,
    values: Any,
    *,
    binary: bool,
    tau: float = TAU,
    alpha: float = ALPHA,
    start: Run | None = None,
) -> dict[str, Any]:
    """The always-valid figures along a stream of ratings (or error flags) in arrival order, on
    the last axis: ``arm`` True for the candidate's, ``values`` the ratings. For every prefix: ``p``
    the running minimum of the mSPRT's p over the prefixes so far, ``low`` / ``high`` the running
    intersection of their intervals (a prefix's own interval where that intersection is empty;
    ``run_low`` / ``run_high`` the intersection itself), ``diff`` candidate mean minus control mean.
    ``start``: where the stream stood before these observations (pruned ones, see retention.py)."""
    import numpy as np

    arm, values = np.asarray(arm, dtype=bool), np.asarray(values, dtype=float)
    b, a = np.where(arm, values, 0.0), np.where(arm, 0.0, values)
    n_b = np.cumsum(arm, axis=-1)
    n_a = np.arange(1, arm.shape[-1] + 1) - n_b
    sums = [np.cumsum(x, axis=-1) for x in (a, a * a, b, b * b)]
    p0, low0, high0 = 1.0, -INF, INF
    if start is not None:
        c0, s0, q0, m0, t0, r0 = _sides(start.control, start.candidate)
        n_a, n_b = n_a + c0, n_b + m0
        sums = [sums[0] + s0, sums[1] + q0, sums[2] + t0, sums[3] + r0]
        p0, low0, high0 = start.looks["binary" if binary else "real"]
    p, low, high, diff = msprt(
        n_a, sums[0], sums[1], n_b, sums[2], sums[3], binary=binary, tau=tau, alpha=alpha
    )
    run_low = np.maximum(low0, np.maximum.accumulate(low, axis=-1))
    run_high = np.minimum(high0, np.minimum.accumulate(high, axis=-1))
    empty = run_low > run_high
    return {
        "p": np.minimum(p0, np.minimum.accumulate(p, axis=-1)),
        "low": np.where(empty, low, run_low),
        "high": np.where(empty, high, run_high),
        "diff": diff,
        "run_low": run_low,
        "run_high": run_high,
    }


def interleave(
    control: Sequence[float], control_at: Sequence[int], cand: Sequence[float], cand_at: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The two sides' observations merged into their one time order: (arm, values), arm True for
    the candidate's."""
    import numpy as np

    order = np.argsort(np.concatenate([control_at, cand_at]), kind="stable")
    arm = np.concatenate([np.zeros(len(control), bool), np.ones(len(cand), bool)])[order]
    return arm, np.concatenate([np.asarray(control, float), np.asarray(cand, float)])[order]


def always_valid(
    control: Sequence[float],
    control_at: Sequence[int],
    cand: Sequence[float],
    cand_at: Sequence[int],
    binary: bool,
    start: Run | None = None,
) -> tuple[float, list[float] | None, float]:
    """The always-valid (p, [low, high] or None when unbounded, difference) of the candidate's
    observations against the control's (difference: candidate mean - control mean; ``binary``: 0/1
    values, thumbs or errors). ``control_at`` and ``cand_at`` place each observation in one time
    order; when both are known (as long as the values) the figures are the running ones over every
    prefix of that order (see ``sequential``), else those of the totals. ``start``: the stream's
    pruned prefix, before every observation given."""

    known = len(control_at) == len(control) and len(cand_at) == len(cand)
    if known and len(control) + len(cand) > 0:
        arm, values = interleave(control, control_at, cand, cand_at)
        run = sequential(arm, values, binary=binary, start=start)
        p, low, high, diff = (float(run[k][-1]) for k in ("p", "low", "high", "diff"))
    else:
        a, b = Moments.of(control), Moments.of(cand)
        if start is not None:
            a, b = start.control.merged(a), start.candidate.merged(b)
        p, low, high, diff = (float(x) for x in msprt(*_sides(a, b), binary=binary))
        if start is not None:  # the last look of the pruned prefix, then the totals
            p0, low0, high0 = start.looks["binary" if binary else "real"]
            if max(low, low0) <= min(high, high0):
                low, high = max(low, low0), min(high, high0)
            p = min(p, p0)
    if binary:  # a difference of two rates lies in [-1, 1]
        low, high = max(low, -1.0), min(high, 1.0)
    ci = [low, high] if math.isfinite(low) and math.isfinite(high) else None
    return p, ci, diff


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
