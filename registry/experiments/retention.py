"""Retention: an experiment keeps its recorded responses (``experiment_responses``) for a set time
(``max_age``) or count (``max_responses``), and before deleting the oldest it folds them into its
aggregates (``experiments.pruned``), so that its report stays the same.

The report's figures are all sums over the responses, or running states along them, so a prefix of
the responses in time order can be replaced by what they add up to (``Pruned``):

- each variant's (and the shadow's) totals: requests, errors, tokens, ratings and live evaluator
  scores as count, sum and sum of squares (``stats.Moments``: exact for means, rates, Fisher's and
  Welch's tests), and its latencies counted per millisecond (exact percentiles);
- every always-valid stream (each candidate against the control on the ratings, the error rate,
  the tokens per answer and each live evaluator) as where it stood after the prefix
  (``stats.Run``): both sides' moments, the running minimum of p and the running intersection of
  the intervals, read as 0/1 values and as real ones; the kept responses go on from there;
- the sample ratio counts since the weights were last set, and the served requests and ratings per
  minute (per hour once there are more than ``MAX_POINTS``) for the timeline.

Two figures are not exactly the same after pruning: the timeline places the pruned requests at the
start of their minute, and the ``latency_p95`` guardrail, whose threshold moves with the control's
p95, sees the pruned prefix as one look at its end (the kept responses are looked at one by one):
its p can only be higher than without pruning, never wrongly lower. A response younger than
``GRACE_SECONDS`` is never pruned (gateways flush their responses a second or two late, and users rate
answers after reading them); a rating for a pruned response is refused as unknown, so keep
responses longer than users take to rate them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapterdeck.registry.db import utc
from adapterdeck.registry.experiments.guardrails import series
from adapterdeck.registry.experiments.model import CANDIDATE, Experiment
from adapterdeck.registry.experiments.sequential import Moments, Run, interleave
from adapterdeck.registry.experiments.stats import Stats, weights_set_at

GRACE_SECONDS = 60
MAX_POINTS = 1440  # timeline points per variant before they are merged into coarser ones
_COARSER = {60: 3600, 3600: 86400}


def _counts(data: dict[Any, int] | None) -> dict[int, int]:
    return {int(k): int(v) for k, v in (data or {}).items()}


@dataclass
class Tally:
    """One variant's pruned responses, summed up."""

    requests: int = 0
    errors: int = 0
    latency: dict[int, int] = field(default_factory=dict)  # {ms: requests}
    latency_5xx: dict[int, int] = field(default_factory=dict)  # of those, the 5xx answers
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ratings: Moments = field(default_factory=Moments)
    evals: dict[str, Moments] = field(default_factory=dict)

    def add(self, row: Any) -> None:
        self.requests += 1
        ms = int(row.latency_ms)
        self.latency[ms] = self.latency.get(ms, 0) + 1
        if row.status >= 500:
            self.errors += 1
            self.latency_5xx[ms] = self.latency_5xx.get(ms, 0) + 1
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        if row.score is not None:
            self.ratings.add(row.score)
        for name, score in (row.evals or {}).items():
            self.evals.setdefault(name, Moments()).add(float(score))

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency": {str(k): v for k, v in sorted(self.latency.items())},
            "latency_5xx": {str(k): v for k, v in sorted(self.latency_5xx.items())},
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ratings": self.ratings.to_list(),
            "evals": {k: m.to_list() for k, m in self.evals.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tally:
        return cls(
            requests=data["requests"],
            errors=data["errors"],
            latency=_counts(data.get("latency")),
            latency_5xx=_counts(data.get("latency_5xx")),
            prompt_tokens=data["prompt_tokens"],
            completion_tokens=data["completion_tokens"],
            ratings=Moments.from_list(data.get("ratings")),
            evals={k: Moments.from_list(v) for k, v in (data.get("evals") or {}).items()},
        )


@dataclass
class Pruned:
    """What an experiment kept of the responses retention deleted (see the module's docstring)."""

    count: int = 0
    through: str | None = None  # the newest pruned response's time
    variants: dict[str, Tally] = field(default_factory=dict)
    shadow: dict[str, Tally] = field(default_factory=dict)
    runs: dict[str, dict[str, Run]] = field(default_factory=dict)  # candidate -> metric -> stream
    srm_since: str | None = None
    srm_counts: dict[str, int] = field(default_factory=dict)
    resolution: int = 60  # seconds per timeline point
    points: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # [requests, rated, sum]

    # -- what the report reads -----------------------------------------------------------------

    def seed(self, stats: Stats, tally: Tally | None) -> None:
        """Start a variant's ``Stats`` from its pruned totals."""
        if tally is None:
            return
        stats.requests, stats.errors, stats.pruned = tally.requests, tally.errors, tally.requests
        stats.prompt_tokens, stats.completion_tokens = tally.prompt_tokens, tally.completion_tokens
        stats.pruned_latency = dict(tally.latency)
        stats.pruned_scores = tally.ratings

    def run(self, candidate: str, metric: str) -> Run | None:
        return self.runs.get(candidate, {}).get(metric)

    def ok_latency(self, variant: str) -> dict[int, int]:
        """The pruned latencies of a variant's answers that were not 5xx, {ms: count}."""
        tally = self.variants.get(variant)
        if tally is None:
            return {}
        ok = {ms: k - tally.latency_5xx.get(ms, 0) for ms, k in tally.latency.items()}
        return {ms: k for ms, k in ok.items() if k}

    def evals(self, variant: str, shadow: bool) -> dict[str, Moments]:
        tally = (self.shadow if shadow else self.variants).get(variant)
        return tally.evals if tally is not None else {}

    def timeline_points(self) -> list[tuple[float, str, int, int, float]]:
        return [
            (float(start), variant, int(p[0]), int(p[1]), float(p[2]))
            for variant, points in self.points.items()
            for start, p in points.items()
        ]

    def describe(self) -> dict[str, Any]:
        return {"responses": self.count, "through": self.through}

    # -- folding -------------------------------------------------------------------------------

    def fold(
        self, experiment: Experiment, rows: Sequence[Any], history: Sequence[dict[str, Any]] | None
    ) -> Pruned:
        """These aggregates with ``rows`` added: the oldest responses still kept, in the report's
        order (time, then response id), about to be deleted."""
        out = copy.deepcopy(self)
        if not rows:
            return out
        since = weights_set_at(experiment, history)
        key = since.isoformat() if since else None
        if key != out.srm_since:  # the weights changed since the last pruning: start counting again
            out.srm_since, out.srm_counts = key, {}
        for row in rows:
            at = utc(row.at)
            if row.shadow:
                out.shadow.setdefault(row.variant, Tally()).add(row)
                continue
            out.variants.setdefault(row.variant, Tally()).add(row)
            if since is not None and at >= since:
                out.srm_counts[row.variant] = out.srm_counts.get(row.variant, 0) + 1
            start = int(at.timestamp()) // out.resolution * out.resolution
            point = out.points.setdefault(row.variant, {}).setdefault(start, [0, 0, 0.0])
            point[0] += 1
            if row.score is not None:
                point[1] += 1
                point[2] += float(row.score)
        while max(map(len, out.points.values()), default=0) > MAX_POINTS and out.resolution in _COARSER:
            out._coarsen(_COARSER[out.resolution])
        control = experiment.control.name
        for variant in experiment.variants:
            if variant.role != CANDIDATE:
                continue
            metrics = {"score", "error_rate", "completion_tokens", *experiment.settings.evaluators}
            metrics.update(name for row in rows for name in (row.evals or {}))
            for metric in sorted(metrics):
                a, a_at = series(rows, control, metric)
                b, b_at = series(rows, variant.name, metric)
                if not a and not b:
                    continue
                arm, values = interleave(a, a_at, b, b_at)
                stream = out.runs.setdefault(variant.name, {})
                stream[metric] = stream.get(metric, Run()).advance(arm, values)
        out.count += len(rows)
        newest = max(utc(r.at) for r in rows)
        if out.through is None or newest > datetime.fromisoformat(out.through):
            out.through = newest.isoformat()
        return out

    def _coarsen(self, resolution: int) -> None:
        for variant, points in self.points.items():
            merged: dict[int, list[float]] = {}
            for start, p in points.items():
                into = merged.setdefault(start // resolution * resolution, [0, 0, 0.0])
                for i in range(3):
                    into[i] += p[i]
            self.points[variant] = merged
        self.resolution = resolution

    # -- storage -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "through": self.through,
            "variants": {k: v.to_dict() for k, v in self.variants.items()},
            "shadow": {k: v.to_dict() for k, v in self.shadow.items()},
            "runs": {c: {m: r.to_dict() for m, r in s.items()} for c, s in self.runs.items()},
            "srm": {"since": self.srm_since, "counts": self.srm_counts},
            "timeline": {
                "resolution": self.resolution,
                "points": {v: {str(k): p for k, p in sorted(ps.items())} for v, ps in self.points.items()},
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Pruned | None:
        if not data:
            return None
        timeline = data.get("timeline") or {}
        return cls(
            count=data["count"],
            through=data.get("through"),
            variants={k: Tally.from_dict(v) for k, v in data["variants"].items()},
            shadow={k: Tally.from_dict(v) for k, v in (data.get("shadow") or {}).items()},
            runs={c: {m: Run.from_dict(r) for m, r in s.items()} for c, s in data["runs"].items()},
            srm_since=(data.get("srm") or {}).get("since"),
            srm_counts=dict((data.get("srm") or {}).get("counts") or {}),
            resolution=int(timeline.get("resolution", 60)),
            points={
                v: {int(k): list(p) for k, p in ps.items()}
                for v, ps in (timeline.get("points") or {}).items()
            },
        )
