"""A/B experiments: a public name ``tenant/name`` split between variants, sticky per user.

An experiment has a control, one or more weighted candidates (versions of adapters of the same
tenant, or the base) and optionally a shadow that gets a copy of the traffic but never answers.

Assignment: ``bucket = sha256(experiment id : user id) mod 10,000``, and every variant owns a set
of bucket ranges. Weights are percentages of traffic; the control gets what the candidates leave.
A weight change moves buckets only from variants that shrink to variants that grow (the fewest
users possible), so raising a candidate's weight moves users into it from the control and never
between two variants whose weights stayed the same.

Every request an experiment serves is recorded (``experiment_responses``) with its variant, status,
latency and tokens; feedback lands on that row. ``report`` compares each candidate with the
control: a Welch t-test on feedback scores (Fisher's exact test when every score is thumbs up or
down) and Fisher's exact test on the error rate.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, select, update

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry import schema as t
from adapterdeck.registry.db import write_transaction
from adapterdeck.registry.refs import DEFAULT_ALIAS, InvalidRef, Ref, parse_adapter, parse_ref
from adapterdeck.registry.registry import Conflict, NotFound, Registry, _iso

BUCKETS = 10_000
BASE = "base"
RUNNING, STOPPED, PROMOTED = "running", "stopped", "promoted"
CONTROL, CANDIDATE, SHADOW = "control", "candidate", "shadow"
# A verdict needs this many ratings (or requests, for the error rate) on each side.
MIN_SAMPLES = 10
ALPHA = 0.05
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
        }


def _first(item: tuple[int, Variant]) -> int:
    return item[0]


# -- buckets -----------------------------------------------------------------------------------


def _count(ranges: list[list[int]]) -> int:
    return sum(end - start for start, end in ranges)


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


# -- the store ---------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _experiment(row: Any) -> Experiment:
    data = row.variants
    return Experiment(
        id=row.id,
        adapter=f"{row.tenant}/{row.adapter}",
        status=row.status,
        variants=[Variant(**v) for v in data["variants"]],
        shadow=Variant(**data["shadow"]) if data.get("shadow") else None,
        winner=row.winner,
        created_by=row.created_by,
        created_at=_iso(row.created_at),
        updated_at=_iso(row.updated_at),
        ended_at=_iso(row.ended_at) if row.ended_at is not None else None,
    )


def _serialize(variants: list[Variant], shadow: Variant | None) -> dict[str, Any]:
    return {
        "variants": [asdict(v) for v in variants],
        "shadow": asdict(shadow) if shadow else None,
    }


_SELECT = (
    select(
        t.experiments,
        t.tenants.c.name.label("tenant"),
        t.adapters.c.name.label("adapter"),
    )
    .select_from(
        t.experiments.join(t.adapters, t.adapters.c.id == t.experiments.c.adapter_id).join(
            t.tenants, t.tenants.c.id == t.adapters.c.tenant_id
        )
    )
    .order_by(t.experiments.c.id)
)


class Experiments:
    """The experiments of a registry: define, change and end them; record traffic and feedback."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.engine = registry.engine

    # -- reading -----------------------------------------------------------------------------

    def running(self) -> dict[str, Experiment]:
        """Every running experiment by its public name (what a gateway routes by)."""
        with self.engine.connect() as conn:
            rows = conn.execute(_SELECT.where(t.experiments.c.status == RUNNING)).all()
        return {e.adapter: e for e in map(_experiment, rows)}

    def get(self, name: str, *, experiment_id: int | None = None) -> Experiment:
        """The running experiment on ``name``, else its newest one (or the one with that id)."""
        ref = parse_adapter(name)
        query = _SELECT.where(t.tenants.c.name == ref.tenant, t.adapters.c.name == ref.name)
        if experiment_id is not None:
            query = query.where(t.experiments.c.id == experiment_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            raise NotFound(f"no experiment on {ref.adapter}")
        found = [_experiment(r) for r in rows]
        return next((e for e in found if e.status == RUNNING), found[-1])

    def list(self, tenant: str | None = None) -> list[Experiment]:
        query = _SELECT if tenant is None else _SELECT.where(t.tenants.c.name == tenant)
        with self.engine.connect() as conn:
            return [_experiment(r) for r in conn.execute(query).all()]

    def history(self, experiment_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.experiment_events)
                .where(t.experiment_events.c.experiment_id == experiment_id)
                .order_by(t.experiment_events.c.id)
            ).all()
        return [{"action": r.action, "by": r.actor, "at": _iso(r.at), **r.detail} for r in rows]

    # -- defining ------------------------------------------------------------------------------

    def _variant(self, adapter: Ref, spec: str, role: str, weight: float = 0.0) -> Variant:
        """``base``, ``vN`` / ``@N`` (a version of the experiment's adapter) or a ref of the tenant."""
        spec = spec.strip()
        if spec == BASE:
            return Variant(BASE, None, role, weight)
        if spec.startswith("@") or (spec[:1] == "v" and spec[1:].isdigit()):
            spec = f"{adapter.adapter}@{spec[1:]}"
        try:
            ref = parse_ref(spec)
        except InvalidRef as exc:
            raise ExperimentError(
                f"variant {spec!r}: {exc} (use base, vN, @N or {adapter.tenant}/name[@N|:alias])"
            ) from None
        if ref.tenant != adapter.tenant:
            raise ExperimentError(f"variant {spec!r}: an experiment only uses {adapter.tenant}'s adapters")
        info = self.registry.resolve(ref)  # pins aliases and bare names to the version they mean now
        name = f"v{info.version}" if info.name == adapter.name else f"{info.name}@{info.version}"
        return Variant(name, info.ref, role, weight)

    def create(
        self,
        name: str,
        control: str,
        candidates: list[tuple[str, float]],
        shadow: str | None = None,
        actor: str = "cli",
    ) -> Experiment:
        """Start an experiment on the public name ``tenant/name``."""
        adapter = parse_adapter(name)
        if not candidates:
            raise ExperimentError("an experiment needs at least one candidate: --candidate REF=WEIGHT")
        variants = [self._variant(adapter, control, CONTROL)]
        for spec, weight in candidates:
            _check_weight(weight)
            variants.append(self._variant(adapter, spec, CANDIDATE, float(weight)))
        shadow_variant = self._variant(adapter, shadow, SHADOW) if shadow else None
        seen: set[str] = set()
        for v in [*variants, *([shadow_variant] if shadow_variant else [])]:
            if v.name in seen:
                raise ExperimentError(f"variant {v.name} is named twice; every variant must differ")
            seen.add(v.name)
        rebalance(variants)
        now = _now()
        with write_transaction(self.engine) as conn:
            adapter_id = self._lock_adapter(conn, adapter)
            busy = conn.execute(
                select(t.experiments.c.id).where(
                    t.experiments.c.adapter_id == adapter_id, t.experiments.c.status == RUNNING
                )
            ).scalar()
            if busy is not None:
                raise Conflict(
                    f"{adapter.adapter} already has a running experiment; stop or promote it first"
                )
            experiment_id = conn.execute(
                t.experiments.insert().values(
                    adapter_id=adapter_id,
                    status=RUNNING,
                    variants=_serialize(variants, shadow_variant),
                    shadow=shadow_variant.ref if shadow_variant else None,
                    created_by=actor,
                    created_at=now,
                    updated_at=now,
                )
            ).inserted_primary_key[0]
            detail = {
                "variants": {v.name: v.weight for v in variants},
                "shadow": shadow_variant.name if shadow_variant else None,
            }
            self._event(conn, experiment_id, "create", actor, detail)
        return self.get(name, experiment_id=experiment_id)

    def set_weight(self, name: str, variant: str, weight: float, actor: str = "cli") -> Experiment:
        """Give a candidate ``weight`` percent of the traffic (the control absorbs the difference)."""
        _check_weight(weight)
        with write_transaction(self.engine) as conn:
            experiment = self._running_for_update(conn, name)
            target = experiment.variant(variant)
            if target.role != CANDIDATE:
                raise ExperimentError(
                    f"{target.name} is the {target.role}; only a candidate's weight is set "
                    "(the control gets the rest)"
                )
            old = target.weight
            target.weight = float(weight)
            rebalance(experiment.variants)
            self._save(conn, experiment)
            self._event(
                conn, experiment.id, "set-weight", actor, {"variant": target.name, "from": old, "to": weight}
            )
        return self.get(name, experiment_id=experiment.id)

    def promote(self, name: str, variant: str, actor: str = "cli") -> Experiment:
        """Move the ``prod`` alias to ``variant`` and end the experiment."""
        adapter = parse_adapter(name)
        with write_transaction(self.engine) as conn:
            experiment = self._running_for_update(conn, name)
            winner = experiment.variant(variant)
            if winner.role == SHADOW:
                raise ExperimentError(f"{winner.name} is the shadow; promote the control or a candidate")
            if winner.ref is None or parse_ref(winner.ref).name != adapter.name:
                raise ExperimentError(
                    f"cannot promote {winner.name}: {DEFAULT_ALIAS} can only point at a version of "
                    f"{adapter.adapter}; stop the experiment instead"
                )
            self._point_prod(conn, experiment, winner)
            self._end(conn, experiment, PROMOTED, winner.name)
            self._event(conn, experiment.id, "promote", actor, {"variant": winner.name, "ref": winner.ref})
        return self.get(name, experiment_id=experiment.id)

    def stop(self, name: str, actor: str = "cli") -> Experiment:
        """End the experiment: all traffic goes back to the control.

        When the control is a version of the experiment's own adapter, ``prod`` is pointed at it, so
        ``tenant/name`` keeps meaning the control after the experiment (not, say, a newer version).
        """
        adapter = parse_adapter(name)
        with write_transaction(self.engine) as conn:
            experiment = self._running_for_update(conn, name)
            control = experiment.control
            if control.ref is not None and parse_ref(control.ref).name == adapter.name:
                self._point_prod(conn, experiment, control)
            self._end(conn, experiment, STOPPED, None)
            self._event(conn, experiment.id, "stop", actor, {"control": control.name})
        return self.get(name, experiment_id=experiment.id)

    def pinned_by(self, conn: Connection, ref: str) -> list[str]:
        """The running experiments that serve ``ref`` (a version must not be deleted under them)."""
        rows = conn.execute(_SELECT.where(t.experiments.c.status == RUNNING)).all()
        return [
            e.adapter
            for e in map(_experiment, rows)
            if any(v.ref == ref for v in [*e.variants, *([e.shadow] if e.shadow else [])])
        ]

    # -- traffic and feedback -------------------------------------------------------------------

    def record(self, rows: list[dict[str, Any]]) -> None:
        """Store served (and shadowed) requests: response_id, experiment_id, variant, shadow, status,
        latency_ms, prompt_tokens, completion_tokens, output (shadow only), at."""
        if not rows:
            return
        with write_transaction(self.engine) as conn:
            known = set(
                conn.execute(
                    select(t.experiment_responses.c.response_id).where(
                        t.experiment_responses.c.response_id.in_([r["response_id"] for r in rows])
                    )
                ).scalars()
            )
            fresh = [r for r in rows if r["response_id"] not in known]
            if fresh:
                conn.execute(t.experiment_responses.insert(), fresh)

    def feedback(self, response_id: str, score: float, tenant: str | None) -> dict[str, Any]:
        """Rate a response an experiment served; ``tenant`` None is the admin (any tenant's)."""
        if not math.isfinite(score):
            raise ExperimentError("the score must be a finite number")
        r = t.experiment_responses
        with write_transaction(self.engine) as conn:
            row = conn.execute(
                select(
                    r.c.response_id,
                    r.c.variant,
                    r.c.shadow,
                    t.tenants.c.name.label("tenant"),
                    t.adapters.c.name.label("adapter"),
                )
                .select_from(
                    r.join(t.experiments, t.experiments.c.id == r.c.experiment_id)
                    .join(t.adapters, t.adapters.c.id == t.experiments.c.adapter_id)
                    .join(t.tenants, t.tenants.c.id == t.adapters.c.tenant_id)
                )
                .where(r.c.response_id == response_id)
            ).first()
            if row is None or row.shadow or (tenant is not None and row.tenant != tenant):
                raise NotFound(f"no response {response_id!r} served by an experiment")
            conn.execute(
                update(r).where(r.c.response_id == response_id).values(score=score, feedback_at=_now())
            )
        experiment = f"{row.tenant}/{row.adapter}"
        return {"response_id": response_id, "experiment": experiment, "variant": row.variant, "score": score}

    def report(self, name: str) -> dict[str, Any]:
        """Each variant side by side, candidates tested against the control, and a verdict."""
        experiment = self.get(name)
        r = t.experiment_responses
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    r.c.variant,
                    r.c.shadow,
                    r.c.status,
                    r.c.latency_ms,
                    r.c.prompt_tokens,
                    r.c.completion_tokens,
                    r.c.score,
                ).where(r.c.experiment_id == experiment.id)
            ).all()
            shadow_samples = conn.execute(
                select(r.c.output)
                .where(r.c.experiment_id == experiment.id, r.c.shadow == 1, r.c.output.is_not(None))
                .order_by(r.c.at.desc())
                .limit(5)
            ).scalars()
            samples = list(shadow_samples)
        stats = {v.name: _Stats() for v in experiment.variants}
        shadow_stats = _Stats()
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
                "recent_outputs": samples,
            }
        out["verdict"] = "; ".join(e["vs_control"]["verdict"] for e in variants if "vs_control" in e)
        out["history"] = self.history(experiment.id)
        return out

    # -- internals -----------------------------------------------------------------------------

    def _lock_adapter(self, conn: Connection, adapter: Ref) -> int:
        adapter_id = conn.execute(
            select(t.adapters.c.id)
            .select_from(t.adapters.join(t.tenants, t.tenants.c.id == t.adapters.c.tenant_id))
            .where(t.tenants.c.name == adapter.tenant, t.adapters.c.name == adapter.name)
            .with_for_update()
        ).scalar()
        if adapter_id is None:
            raise NotFound(f"no adapter {adapter.adapter}")
        return adapter_id

    def _running_for_update(self, conn: Connection, name: str) -> Experiment:
        adapter = parse_adapter(name)
        adapter_id = self._lock_adapter(conn, adapter)
        row = conn.execute(
            _SELECT.where(t.experiments.c.adapter_id == adapter_id, t.experiments.c.status == RUNNING)
        ).first()
        if row is None:
            raise NotFound(f"no running experiment on {adapter.adapter}")
        return _experiment(row)

    def _save(self, conn: Connection, experiment: Experiment) -> None:
        conn.execute(
            update(t.experiments)
            .where(t.experiments.c.id == experiment.id)
            .values(variants=_serialize(experiment.variants, experiment.shadow), updated_at=_now())
        )

    def _end(self, conn: Connection, experiment: Experiment, status: str, winner: str | None) -> None:
        now = _now()
        conn.execute(
            update(t.experiments)
            .where(t.experiments.c.id == experiment.id)
            .values(status=status, winner=winner, updated_at=now, ended_at=now)
        )

    def _point_prod(self, conn: Connection, experiment: Experiment, variant: Variant) -> None:
        assert variant.ref is not None
        ref = parse_ref(variant.ref)
        adapter_id = self.registry._adapter_id(conn, ref)
        current = conn.execute(
            select(t.versions.c.version)
            .select_from(t.aliases.join(t.versions, t.versions.c.id == t.aliases.c.version_id))
            .where(and_(t.aliases.c.adapter_id == adapter_id, t.aliases.c.alias == DEFAULT_ALIAS))
        ).scalar()
        if current == ref.version:
            return
        info = self.registry.resolve(ref)
        version_id = self.registry._version_id(conn, info)
        self.registry._move_alias(conn, adapter_id, DEFAULT_ALIAS, version_id, info.version)

    def _event(self, conn: Connection, experiment_id: int, action: str, actor: str, detail: dict) -> None:
        conn.execute(
            t.experiment_events.insert().values(
                experiment_id=experiment_id, action=action, actor=actor, detail=detail, at=_now()
            )
        )


def _check_weight(weight: float) -> None:
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


# -- statistics ----------------------------------------------------------------------------------


@dataclass
class _Stats:
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


def compare(name: str, cand: _Stats, control_name: str, control: _Stats) -> dict[str, Any]:
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
