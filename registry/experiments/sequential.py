"""Always-valid inference for an experiment: the mSPRT, its running figures along a stream of
observations, and where a stream stood after a prefix (``Run``, what retention keeps).

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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

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
