"""An experiment's figures: each variant summed up, and each candidate tested against the control.

Feedback scores are compared with a Welch t-test (Fisher's exact test when every score is thumbs up
or down), the error rate with Fisher's exact test. A verdict needs ``MIN_SAMPLES`` on each side.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from adapterdeck.registry.db import utc
from adapterdeck.registry.experiments.model import CANDIDATE, Experiment

TIMELINE_BUCKETS = 24  # points of an experiment's timeline (the dashboard's charts)
# A verdict needs this many ratings (or requests, for the error rate) on each side.
MIN_SAMPLES = 10
ALPHA = 0.05


def summarize(experiment: Experiment, rows: Iterable[Any], shadow_outputs: list[str]) -> dict[str, Any]:
    """The experiment with each variant's figures side by side, candidates tested against the
    control, and a verdict; ``rows`` are its recorded responses."""
    stats = {v.name: Stats() for v in experiment.variants}
    shadow_stats = Stats()
    for row in rows:
        target = shadow_stats if row.shadow else stats.get(row.variant)
        if target is not None:
            target.add(row)
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
            entry["vs_control"] = compare(v.name, stats[v.name], experiment.control.name, control)
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
    out["verdict"] = "; ".join(e["vs_control"]["verdict"] for e in variants if "vs_control" in e)
    out["timeline"] = timeline([v.name for v in experiment.variants], rows)
    return out


def timeline(names: list[str], rows: Iterable[Any], buckets: int = TIMELINE_BUCKETS) -> dict[str, Any]:
    """The served requests (not the shadow's) in ``buckets`` equal spans of time from the first to
    the last: per variant, requests, how many of them were rated, and their mean score (None:
    none rated)."""
    served = [(utc(r.at).timestamp(), r) for r in rows if not r.shadow and r.variant in names]
    if not served:
        return {"start": [], "variants": {n: {"requests": [], "rated": [], "mean_score": []} for n in names}}
    first = min(at for at, _ in served)
    span = max(max(at for at, _ in served) - first, 1.0)
    count = {n: [0] * buckets for n in names}
    scored = {n: [[0.0, 0] for _ in range(buckets)] for n in names}
    for at, r in served:
        i = min(buckets - 1, int((at - first) / span * buckets))
        count[r.variant][i] += 1
        if r.score is not None:
            scored[r.variant][i][0] += r.score
            scored[r.variant][i][1] += 1
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
    """One variant's recorded requests, summed up."""

    requests: int = 0
    errors: int = 0
    latencies: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    scores: list[float] = field(default_factory=list)

    def add(self, row: Any) -> None:
        self.requests += 1
        self.errors += int(row.status >= 500)
        self.latencies.append(row.latency_ms)
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        if row.score is not None:
            self.scores.append(row.score)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 4) if self.requests else None,
            "latency_ms_p50": pct(0.5),
            "latency_ms_p95": pct(0.95),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "feedback": len(self.scores),
            "mean_score": round(sum(self.scores) / len(self.scores), 4) if self.scores else None,
        }


def _p(value: float) -> str:
    return f"p={value:.2g}" if value >= 0.001 else "p<0.001"


def compare(name: str, cand: Stats, control_name: str, control: Stats) -> dict[str, Any]:
    """Test a candidate against the control: feedback first, then the error rate."""
    from scipy import stats

    out: dict[str, Any] = {"feedback_test": None, "feedback_p": None, "errors_p": None}
    verdicts = []
    if len(cand.scores) >= MIN_SAMPLES and len(control.scores) >= MIN_SAMPLES:
        binary = all(s in (0.0, 1.0) for s in [*cand.scores, *control.scores])
        if binary:
            up_c, up_k = int(sum(cand.scores)), int(sum(control.scores))
            table = [[up_c, len(cand.scores) - up_c], [up_k, len(control.scores) - up_k]]
            p = float(stats.fisher_exact(table).pvalue)
            out["feedback_test"] = "fisher_exact"
        elif len(set(cand.scores)) == 1 and set(cand.scores) == set(control.scores):
            p = 1.0
            out["feedback_test"] = "welch_t"
        else:
            p = float(stats.ttest_ind(cand.scores, control.scores, equal_var=False).pvalue)
            out["feedback_test"] = "welch_t"
        p = 1.0 if math.isnan(p) else p
        out["feedback_p"] = p
        diff = sum(cand.scores) / len(cand.scores) - sum(control.scores) / len(control.scores)
        if p < ALPHA:
            verdicts.append(f"{name} {'better' if diff > 0 else 'worse'} than {control_name}, {_p(p)}")
        else:
            verdicts.append(f"no significant difference between {name} and {control_name}, {_p(p)}")
    else:
        verdicts.append(
            f"not enough data ({name}: {len(cand.scores)} ratings, {control_name}: "
            f"{len(control.scores)}; a verdict needs {MIN_SAMPLES} each)"
        )
    if cand.requests >= MIN_SAMPLES and control.requests >= MIN_SAMPLES and (cand.errors or control.errors):
        table = [
            [cand.errors, cand.requests - cand.errors],
            [control.errors, control.requests - control.errors],
        ]
        p = float(stats.fisher_exact(table).pvalue)
        out["errors_p"] = p
        if p < ALPHA:
            more = cand.errors / cand.requests > control.errors / control.requests
            verdicts.append(f"{name} has {'more' if more else 'fewer'} errors, {_p(p)}")
    out["verdict"] = "; ".join(verdicts)
    return out
