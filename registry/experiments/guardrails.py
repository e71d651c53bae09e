"""An experiment's own rules, judged on what it recorded: guardrails (metrics a candidate must not
make worse than the control by more than a margin), the live evaluators' scores per variant, and
the decision they lead to (roll back, promote, or nothing yet).

Every guardrail is tested with the same always-valid figures as the ratings (``stats.py``: the
mSPRT's confidence sequence over the responses in time order), so checking it after every request
does not inflate false alarms. A guardrail is **breached** when the whole interval for the
candidate's worsening lies beyond the margin:

- ``error_rate``: the difference of the 5xx shares (candidate - control) is above ``margin``.
- ``completion_tokens``: the difference of the mean tokens per answer is above ``margin`` x the
  control's mean.
- ``latency_p95``: with T = (1 + ``margin``) x the control's p95, the candidate's share of requests
  slower than T is above the control's (interval above 0) and its own p95 is above T: more than 5%
  of its requests take longer than the control's p95 allows.
- a live evaluator: the difference of mean scores is beyond ``margin`` in the worse direction (lower
  for an evaluator whose ``higher_is_better``).

A guardrail **holds** while it is not breached and each side has ``MIN_SAMPLES`` observations of it;
before that it has ``not enough data``. Auto-promote promotes a candidate whose ratings win (the
sequential verdict) while every guardrail holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapterdeck.registry.experiments.model import CANDIDATE, Experiment, Guardrail
from adapterdeck.registry.experiments.sequential import ALPHA, MIN_SAMPLES, Moments, Run, always_valid
from adapterdeck.registry.experiments.stats import quantile

if TYPE_CHECKING:
    from adapterdeck.registry.experiments.retention import Pruned

BREACHED, HOLDS, NOT_ENOUGH = "breached", "holds", "not enough data"


def series(rows: Sequence[Any], variant: str, metric: str) -> tuple[list[float], list[int]]:
    """One variant's observations of ``metric`` (served requests, not the shadow's; ``score``: the
    ratings) with their places in the time order of ``rows``."""
    values, places = [], []
    for i, row in enumerate(rows):
        if row.shadow or row.variant != variant:
            continue
        if metric == "score":
            value: float | None = row.score
        elif metric == "error_rate":
            value = float(row.status >= 500)
        elif metric == "completion_tokens":
            value = float(row.completion_tokens) if row.status < 400 else None
        elif metric == "latency_p95":
            value = float(row.latency_ms) if row.status < 500 else None
        else:
            value = (row.evals or {}).get(metric)
        if value is not None:
            values.append(float(value))
            places.append(i)
    return values, places


def _higher_is_better(metric: str) -> bool:
    from adapterdeck.core.plugins import catalog

    return bool(type(catalog().evaluator(metric)).higher_is_better)


def _over(counts: dict[int, int], threshold: float) -> Moments:
    """0/1 moments of the latencies counted in ``counts`` ({ms: count}): 1 for those above."""
    n = sum(counts.values())
    k = sum(c for ms, c in counts.items() if ms > threshold)
    if not n:
        return Moments()
    return Moments(n, float(k), float(k), 0.0 if k < n else 1.0, 1.0 if k else 0.0)


def check(
    rail: Guardrail, rows: Sequence[Any], control: str, candidate: str, pruned: Pruned | None = None
) -> dict[str, Any]:
    """One guardrail for one candidate: its figures and ``status`` (breached, holds, not enough
    data); ``pruned``: what retention kept of the responses it deleted."""
    a, a_at = series(rows, control, rail.metric)
    b, b_at = series(rows, candidate, rail.metric)
    out: dict[str, Any] = {"metric": rail.metric, "margin": rail.margin, "variant": candidate}
    out["control_value"] = out["value"] = None
    latency = rail.metric == "latency_p95"
    run: Run | None = None
    if latency:  # the pruned latencies are counted, not ordered: one look at the pruned prefix
        held_a = pruned.ok_latency(control) if pruned is not None else {}
        held_b = pruned.ok_latency(candidate) if pruned is not None else {}
        n_a, n_b = len(a) + sum(held_a.values()), len(b) + sum(held_b.values())
        if n_a:
            out["control_value"] = round(quantile(a, 0.95, held_a), 4)
        if n_b:
            out["value"] = round(quantile(b, 0.95, held_b), 4)
    else:
        run = pruned.run(candidate, rail.metric) if pruned is not None else None
        mine, theirs = Moments.of(a), Moments.of(b)
        if run is not None:
            mine, theirs = run.control.merged(mine), run.candidate.merged(theirs)
        n_a, n_b = mine.n, theirs.n
        if n_a:
            out["control_value"] = round(mine.total / n_a, 4)
        if n_b:
            out["value"] = round(theirs.total / n_b, 4)
    if n_a < MIN_SAMPLES or n_b < MIN_SAMPLES:
        return {**out, "status": NOT_ENOUGH, "p": None, "ci": None}
    if latency:
        threshold = (1 + rail.margin) * quantile(a, 0.95, held_a)
        start = Run.once(_over(held_a, threshold), _over(held_b, threshold)) if held_a or held_b else None
        p, ci, _ = always_valid(
            [float(x > threshold) for x in a], a_at, [float(x > threshold) for x in b], b_at, True, start
        )
        breached = ci is not None and ci[0] > 0 and quantile(b, 0.95, held_b) > threshold
        out["threshold_ms"] = round(threshold, 1)
    else:
        binary = mine.nonbinary == 0 and theirs.nonbinary == 0
        p, ci, _ = always_valid(a, a_at, b, b_at, binary, run)
        if rail.metric == "error_rate":
            breached = ci is not None and ci[0] > rail.margin
        elif rail.metric == "completion_tokens":
            breached = ci is not None and ci[0] > rail.margin * (mine.total / mine.n)
        elif _higher_is_better(rail.metric):
            breached = ci is not None and ci[1] < -rail.margin
        else:
            breached = ci is not None and ci[0] > rail.margin
    ci_out = [round(x, 4) for x in ci] if ci is not None else None
    return {**out, "status": BREACHED if breached else HOLDS, "p": p, "ci": ci_out}


def judge(
    experiment: Experiment, rows: Sequence[Any], report: dict[str, Any], pruned: Pruned | None = None
) -> dict[str, Any]:
    """Every guardrail for every candidate, the live evaluators' means per variant (the shadow's
    too), and the ``decision``: ``rollback`` (a breach; its reason), ``promote`` (auto-promote, a
    candidate that wins with every guardrail holding), or None."""
    settings = experiment.settings
    control = experiment.control.name
    rails = [
        check(rail, rows, control, v.name, pruned)
        for v in experiment.variants
        if v.role == CANDIDATE
        for rail in settings.guardrails
    ]
    live: dict[str, dict[str, Any]] = {}
    names = [v.name for v in experiment.variants] + ([experiment.shadow.name] if experiment.shadow else [])
    for name in names:
        shadow = experiment.shadow is not None and name == experiment.shadow.name
        scored = [r.evals for r in rows if r.variant == name and bool(r.shadow) == shadow and r.evals]
        held = pruned.evals(name, shadow) if pruned is not None else {}
        live[name] = {
            evaluator: {"scored": m.n, "mean": round(m.total / m.n, 4) if m.n else None}
            for evaluator in settings.evaluators
            for m in [
                held.get(evaluator, Moments()).merged(
                    Moments.of(float(s[evaluator]) for s in scored if evaluator in s)
                )
            ]
        }
    decision = None
    breach = next((r for r in rails if r["status"] == BREACHED), None)
    if breach is not None:
        decision = {
            "decision": "rollback",
            "variant": breach["variant"],
            "metric": breach["metric"],
            "reason": (
                f"guardrail {breach['metric']} breached by {breach['variant']}: {breach['value']} against "
                f"{control}'s {breach['control_value']} (margin {breach['margin']:g}, always-valid "
                f"interval {breach['ci']}, alpha {ALPHA}); traffic returned to {control}"
            ),
        }
    elif settings.auto_promote:
        for entry in report.get("variants", []):
            seq = (entry.get("vs_control") or {}).get("sequential") or {}
            verdict = (entry.get("vs_control") or {}).get("verdict", "")
            mine = [r for r in rails if r["variant"] == entry["name"]]
            if verdict.startswith(f"{entry['name']} better than") and all(r["status"] == HOLDS for r in mine):
                decision = {
                    "decision": "promote",
                    "variant": entry["name"],
                    "metric": None,
                    "reason": (
                        f"auto-promote: {entry['name']} better than {control} on ratings "
                        f"(always-valid p={seq.get('feedback_p', float('nan')):.2g}) with every "
                        "guardrail holding"
                    ),
                }
                break
    return {"guardrails": rails, "live_evaluators": live, "decision": decision}
