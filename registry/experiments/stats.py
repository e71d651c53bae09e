"""An experiment's figures: each variant summed up, and each candidate tested against the control.

Feedback scores are compared with a Welch t-test (Fisher's exact test when every score is thumbs up
or down), the error rate with Fisher's exact test. A verdict needs ``MIN_SAMPLES`` on each side.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from adapterdeck.registry.experiments.model import CANDIDATE, Experiment

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
    return out


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
