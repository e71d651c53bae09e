"""A/B experiments: a public name ``tenant/name`` split between variants, sticky per user.

An experiment has a control, one or more weighted candidates (versions of adapters of the same
tenant, or the base) and optionally a shadow that gets a copy of the traffic but never answers.

Assignment: ``bucket = sha256(experiment id : user id) mod 10,000``, and every variant owns a set
of bucket ranges. Weights are percentages of traffic; the control gets what the candidates leave.
A weight change moves buckets only from variants that shrink to variants that grow (the fewest
users possible), so raising a candidate's weight moves users into it from the control and never
between two variants whose weights stayed the same.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry.errors import NotFound
from adapterdeck.registry.schema import EXPERIMENT_PROMOTED, EXPERIMENT_RUNNING, EXPERIMENT_STOPPED

BUCKETS = 10_000
BASE = "base"
RUNNING, STOPPED, PROMOTED = EXPERIMENT_RUNNING, EXPERIMENT_STOPPED, EXPERIMENT_PROMOTED
CONTROL, CANDIDATE, SHADOW = "control", "candidate", "shadow"
THUMBS = {"up": 1.0, "down": 0.0}


class ExperimentError(AdapterdeckError):
    """A bad experiment definition or change."""


@dataclass
class Variant:
    name: str  # "v4" for a version of the experiment's adapter, "base", or "other@2"
    ref: str | None  # the immutable ref served; None for the base
    role: str
    weight: float = 0.0  # percent of traffic (0 for the shadow)
    buckets: list[list[int]] = field(default_factory=list)  # [start, end) ranges

    @property
    def share(self) -> int:
        return sum(end - start for start, end in self.buckets)


@dataclass
class Experiment:
    id: int
    adapter: str  # the public name, tenant/name
    status: str
    variants: list[Variant]
    shadow: Variant | None
    winner: str | None
    created_by: str
    created_at: str
    updated_at: str
    ended_at: str | None
    settings: Settings = field(default_factory=lambda: Settings())
    _table: list[tuple[int, Variant]] = field(default_factory=list, repr=False)
    _starts: list[int] = field(default_factory=list, repr=False)

    @property
    def tenant(self) -> str:
        return self.adapter.split("/", 1)[0]

    @property
    def control(self) -> Variant:
        return self.variants[0]

    def variant(self, text: str) -> Variant:
        """A variant by its name (``v4``, ``base``) or its ref (``acme/support@4``)."""
        wanted = f"v{text[1:]}" if text.startswith("@") else text
        for variant in [*self.variants, *([self.shadow] if self.shadow else [])]:
            if wanted in (variant.name, variant.ref):
                return variant
        names = ", ".join(v.name for v in self.variants)
        raise NotFound(f"experiment {self.adapter} has no variant {text!r} (variants: {names})")

    def bucket(self, user: str | None) -> int:
        if not user:
            return random.randrange(BUCKETS)
        digest = hashlib.sha256(f"{self.id}:{user}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % BUCKETS

    def assign(self, user: str | None) -> Variant:
        """The variant that serves ``user``: the same one for as long as the weights allow."""
        if not self._table:  # every bucket is owned: the range holding a bucket starts at or before it
            self._table = sorted(((start, v) for v in self.variants for start, _ in v.buckets), key=_first)
            self._starts = [start for start, _ in self._table]
        return self._table[bisect.bisect_right(self._starts, self.bucket(user)) - 1][1]

    def to_dict(self) -> dict[str, Any]:
        def one(v: Variant) -> dict[str, Any]:
            return {**asdict(v), "traffic": round(v.share / BUCKETS * 100, 2)}

        return {
            "id": self.id,
            "name": self.adapter,
            "status": self.status,
            "control": self.control.name,
            "variants": [one(v) for v in self.variants],
            "shadow": one(self.shadow) if self.shadow else None,
            "winner": self.winner,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "ended_at": self.ended_at,
            "settings": self.settings.to_dict(),
        }


def _first(item: tuple[int, Variant]) -> int:
    return item[0]


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if end <= start:
            continue
        if out and out[-1][1] == start:
            out[-1][1] = end
        else:
            out.append([start, end])
    return out


def _release(ranges: list[list[int]], n: int) -> tuple[list[list[int]], list[list[int]]]:
    """Give up ``n`` buckets from the top of ``ranges``: (kept, released)."""
    kept, released = [list(r) for r in ranges], []
    while n > 0:
        start, end = kept[-1]
        take = min(n, end - start)
        released.append([end - take, end])
        if take == end - start:
            kept.pop()
        else:
            kept[-1][1] = end - take
        n -= take
    return kept, released


def _take(pool: list[list[int]], n: int) -> tuple[list[list[int]], list[list[int]]]:
    """Take ``n`` buckets from the bottom of ``pool``: (taken, rest)."""
    rest, taken = [list(r) for r in pool], []
    while n > 0:
        start, end = rest[0]
        take = min(n, end - start)
        taken.append([start, start + take])
        if take == end - start:
            rest.pop(0)
        else:
            rest[0][0] = start + take
        n -= take
    return taken, rest


def rebalance(variants: list[Variant]) -> None:
    """Give every variant its share of the buckets, moving as few as possible.

    The first variant is the control and gets what the others' weights leave.
    """
    targets = [round(v.weight * BUCKETS / 100) for v in variants[1:]]
    if sum(targets) > BUCKETS:
        total = sum(v.weight for v in variants[1:])
        raise ExperimentError(f"the candidates' weights add up to {total:g}%, more than 100%")
    targets.insert(0, BUCKETS - sum(targets))
    variants[0].weight = round(100 - sum(v.weight for v in variants[1:]), 2)
    # The buckets nobody owns: all of them for a new experiment, none once it has started.
    pool, cursor = [], 0
    for start, end in sorted(r for v in variants for r in v.buckets):
        pool.append([cursor, start])
        cursor = max(cursor, end)
    pool = _merge([*pool, [cursor, BUCKETS]])  # _merge drops the empty ranges
    for variant, target in zip(variants, targets, strict=True):
        surplus = variant.share - target
        if surplus > 0:
            variant.buckets, released = _release(variant.buckets, surplus)
            pool = _merge([*pool, *released])
    for variant, target in zip(variants, targets, strict=True):
        missing = target - variant.share
        if missing > 0:
            taken, pool = _take(pool, missing)
            variant.buckets = _merge([*variant.buckets, *taken])


def check_weight(weight: float) -> None:
    """Refuse a weight that is not a percentage (NaN, infinite, negative, above 100)."""
    if not isinstance(weight, int | float) or not math.isfinite(weight) or not 0 <= weight <= 100:
        raise ExperimentError(f"a weight is a percentage from 0 to 100, got {weight!r}")


def parse_candidate(text: str) -> tuple[str, float]:
    """``REF=WEIGHT`` from the command line."""
    spec, sep, weight = text.rpartition("=")
    try:
        if not sep or not spec:
            raise ValueError
        return spec, float(weight)
    except ValueError:
        raise ExperimentError(f"{text!r}: expected REF=WEIGHT, for example v4=10") from None


# -- settings: guardrails, auto-promote, live evaluators --------------------------------------------

#: The metrics a guardrail can watch besides a live evaluator's score, and what its margin means.
GUARDRAIL_METRICS: dict[str, str] = {
    "error_rate": "the share of requests answered with a 5xx; margin in points (0.01: one point)",
    "latency_p95": "the 95th percentile of latency; margin as a fraction of the control's (0.2: 20% slower)",
    "completion_tokens": "tokens per answer; margin as a fraction of the control's mean (0.5: +50%)",
}
#: A live evaluator's guardrail: its mean score may be worse than the control's by ``margin``
#: (absolute, in the evaluator's units: 0.05 is five points of a 0-1 score).
EVALUATOR_MARGIN = (
    "the evaluator's mean score on live answers; margin absolute (0.05: five points of a 0-1 score)"
)


@dataclass
class Guardrail:
    metric: str  # a key of GUARDRAIL_METRICS or a live evaluator's name
    margin: float


@dataclass
class Retention:
    """How long an experiment keeps each recorded response (``experiment_responses``): at most
    ``max_age`` seconds, at most ``max_responses`` of them (None: no bound). What is deleted is
    folded into the experiment's aggregates first, so its report stays the same (retention.py)."""

    max_age: float | None = None
    max_responses: int | None = None

    def __bool__(self) -> bool:
        return self.max_age is not None or self.max_responses is not None


@dataclass
class Settings:
    guardrails: list[Guardrail] = field(default_factory=list)
    #: Promote the candidate when it wins on the ratings and every guardrail holds.
    auto_promote: bool = False
    #: Reference-free evaluators scored on a sample of every variant's answers (the shadow's too).
    evaluators: list[str] = field(default_factory=list)
    eval_sample: float = 1.0  # the share of answers scored
    retention: Retention = field(default_factory=Retention)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Settings:
        data = dict(data or {})
        return cls(
            guardrails=[Guardrail(**g) for g in data.get("guardrails") or []],
            auto_promote=bool(data.get("auto_promote", False)),
            evaluators=list(data.get("evaluators") or []),
            eval_sample=float(data.get("eval_sample", 1.0)),
            retention=Retention(**(data.get("retention") or {})),
        )


def _number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ExperimentError(f"{what}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ExperimentError(f"{what}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ExperimentError(f"{what}: expected a finite number, got {value!r}")
    return number


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(what: str, value: Any) -> float:
    """Seconds from a number of seconds or a duration such as ``90s``, ``30m``, ``12h``, ``7d``, ``2w``;
    it must be above 0."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text and text[-1] in _UNITS:
        seconds = _number(what, text[:-1].strip()) * _UNITS[text[-1]]
    else:
        try:
            seconds = _number(what, value)
        except ExperimentError:
            raise ExperimentError(
                f"{what}: expected seconds or a duration such as 90s, 30m, 12h, 7d; got {value!r}"
            ) from None
    if seconds <= 0:
        raise ExperimentError(f"{what}: how long responses are kept must be above 0; got {value!r}")
    return seconds


def parse_retention(max_age: Any = None, max_responses: Any = None) -> Retention:
    """Checked retention: an age above 0 (seconds or 7d-style), a count that is a whole number >= 1."""
    age = None if max_age is None else parse_duration("retention max_age", max_age)
    count = None
    if max_responses is not None:
        number = _number("retention max_responses", max_responses)
        if number != int(number) or number < 1:
            raise ExperimentError(
                f"retention max_responses: how many responses are kept, a whole number >= 1; "
                f"got {max_responses!r}"
            )
        count = int(number)
    return Retention(age, count)


def live_evaluators() -> dict[str, Any]:
    """The registered evaluators that can score a served answer on its own, by name."""
    from adapterdeck.core.plugins import catalog

    return {name: r.obj for name, r in catalog().evaluators.items() if type(r.obj).live()}


def check_evaluator(name: str) -> None:
    """Refuse an evaluator that is unknown or cannot judge live answers, naming those that can."""
    from adapterdeck.core.plugins import catalog

    live = live_evaluators()
    if name in live:
        return
    can = ", ".join(sorted(live)) or "none is installed"
    if name in catalog().evaluators:
        raise ExperimentError(
            f"evaluator {name!r} cannot score live answers (it needs a reference answer, the loss "
            f"or a probe set of its own); those that can: {can}"
        )
    raise ExperimentError(f"unknown evaluator {name!r}; those that score live answers: {can}")


def parse_settings(
    guardrails: list[tuple[str, Any]] | None = None,
    *,
    auto_promote: bool = False,
    evaluators: list[str] | None = None,
    eval_sample: Any = 1.0,
    retention: Retention | None = None,
) -> Settings:
    """Checked settings: every guardrail on a known metric with a margin that is a number >= 0 (a
    guardrail on a live evaluator adds that evaluator), a sample share in (0, 1], a retention
    checked by ``parse_retention``."""
    chosen = list(dict.fromkeys(evaluators or []))
    for name in chosen:
        check_evaluator(name)
    rails = []
    for metric, margin in guardrails or []:
        if metric not in GUARDRAIL_METRICS:
            try:
                check_evaluator(metric)
            except ExperimentError as exc:
                known = ", ".join(GUARDRAIL_METRICS)
                raise ExperimentError(
                    f"guardrail {metric!r}: not one of {known}, nor a live evaluator ({exc})"
                ) from None
            if metric not in chosen:
                chosen.append(metric)
        value = _number(f"guardrail {metric}: margin", margin)
        if value < 0:
            raise ExperimentError(
                f"guardrail {metric}: the margin is how much worse is tolerated, >= 0; got {value:g}"
            )
        if any(r.metric == metric for r in rails):
            raise ExperimentError(f"guardrail {metric} is given twice")
        rails.append(Guardrail(metric, value))
    sample = _number("eval_sample", eval_sample)
    if not 0 < sample <= 1:
        raise ExperimentError(f"eval_sample is the share of answers scored, in (0, 1]; got {sample:g}")
    return Settings(
        guardrails=rails,
        auto_promote=bool(auto_promote),
        evaluators=chosen,
        eval_sample=sample,
        retention=retention or Retention(),
    )


def parse_guardrail(text: str) -> tuple[str, str]:
    """``METRIC=MARGIN`` from the command line (the margin checked by ``parse_settings``)."""
    metric, sep, margin = text.partition("=")
    if not sep or not metric.strip() or not margin.strip():
        raise ExperimentError(f"{text!r}: expected METRIC=MARGIN, for example error_rate=0.01")
    return metric.strip(), margin.strip()
