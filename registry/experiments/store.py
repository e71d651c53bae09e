"""The experiments of a registry in its database: their definitions, changes and end, and every
request they serve (``experiment_responses``: variant, status, latency and tokens; feedback lands
on that row). Every change runs in one write transaction holding the adapter's row, and is kept
in ``experiment_events``.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, func, select, update

import adapterdeck.registry.schema as t
from adapterdeck.registry.db import iso, now, write_transaction
from adapterdeck.registry.errors import Conflict, NotFound
from adapterdeck.registry.experiments.guardrails import judge
from adapterdeck.registry.experiments.model import (
    BASE,
    CANDIDATE,
    CONTROL,
    PROMOTED,
    RUNNING,
    SHADOW,
    STOPPED,
    Experiment,
    ExperimentError,
    Settings,
    Variant,
    check_weight,
    rebalance,
)
from adapterdeck.registry.experiments.retention import GRACE_SECONDS, Pruned
from adapterdeck.registry.experiments.stats import summarize
from adapterdeck.registry.refs import DEFAULT_ALIAS, InvalidRef, Ref, parse_adapter, parse_ref
from adapterdeck.registry.registry import Registry


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
        created_at=iso(row.created_at),
        updated_at=iso(row.updated_at),
        ended_at=iso(row.ended_at) if row.ended_at is not None else None,
        settings=Settings.from_dict(row.settings),
    )


def _serialize(variants: list[Variant], shadow: Variant | None) -> dict[str, Any]:
    return {
        "variants": [asdict(v) for v in variants],
        "shadow": asdict(shadow) if shadow else None,
    }


_RESPONSE_COLUMNS = (
    t.experiment_responses.c.variant,
    t.experiment_responses.c.shadow,
    t.experiment_responses.c.status,
    t.experiment_responses.c.latency_ms,
    t.experiment_responses.c.prompt_tokens,
    t.experiment_responses.c.completion_tokens,
    t.experiment_responses.c.score,
    t.experiment_responses.c.at,
    t.experiment_responses.c.evals,
)
PRUNE_BATCH = 20_000  # responses folded and deleted per transaction

_SELECT = (
    select(
        t.experiments.c.id,
        t.experiments.c.status,
        t.experiments.c.variants,
        t.experiments.c.winner,
        t.experiments.c.created_by,
        t.experiments.c.created_at,
        t.experiments.c.updated_at,
        t.experiments.c.ended_at,
        t.experiments.c.settings,
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
        return [{"action": r.action, "by": r.actor, "at": iso(r.at), **r.detail} for r in rows]

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
        settings: Settings | None = None,
    ) -> Experiment:
        """Start an experiment on the public name ``tenant/name`` (``settings``: its guardrails,
        auto-promote and live evaluators, checked by ``parse_settings``)."""
        settings = settings or Settings()
        adapter = parse_adapter(name)
        if not candidates:
            raise ExperimentError("an experiment needs at least one candidate: --candidate REF=WEIGHT")
        variants = [self._variant(adapter, control, CONTROL)]
        for spec, weight in candidates:
            check_weight(weight)
            variants.append(self._variant(adapter, spec, CANDIDATE, float(weight)))
        shadow_variant = self._variant(adapter, shadow, SHADOW) if shadow else None
        seen: set[str] = set()
        for v in [*variants, *([shadow_variant] if shadow_variant else [])]:
            if v.name in seen:
                raise ExperimentError(f"variant {v.name} is named twice; every variant must differ")
            seen.add(v.name)
        rebalance(variants)
        started = now()
        with write_transaction(self.engine) as conn:
            adapter_id = self.registry.adapter_id(conn, adapter, lock=True)
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
                    settings=settings.to_dict(),
                    created_by=actor,
                    created_at=started,
                    updated_at=started,
                )
            ).inserted_primary_key[0]
            detail = {
                "variants": {v.name: v.weight for v in variants},
                "shadow": shadow_variant.name if shadow_variant else None,
                "settings": settings.to_dict(),
            }
            self._event(conn, experiment_id, "create", actor, detail)
        return self.get(name, experiment_id=experiment_id)

    def set_weight(self, name: str, variant: str, weight: float, actor: str = "cli") -> Experiment:
        """Give a candidate ``weight`` percent of the traffic (the control absorbs the difference)."""
        check_weight(weight)
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

    def promote(self, name: str, variant: str, actor: str = "cli", reason: str | None = None) -> Experiment:
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
            detail = {"variant": winner.name, "ref": winner.ref, **({"reason": reason} if reason else {})}
            self._event(conn, experiment.id, "promote", actor, detail)
        return self.get(name, experiment_id=experiment.id)

    def stop(self, name: str, actor: str = "cli", reason: str | None = None) -> Experiment:
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
            detail = {"control": control.name, **({"reason": reason} if reason else {})}
            self._event(conn, experiment.id, "stop", actor, detail)
        return self.get(name, experiment_id=experiment.id)

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
            done = conn.execute(
                update(r).where(r.c.response_id == response_id).values(score=score, feedback_at=now())
            )
            if not done.rowcount:  # deleted meanwhile by retention
                raise NotFound(f"no response {response_id!r} served by an experiment")
        experiment = f"{row.tenant}/{row.adapter}"
        return {"response_id": response_id, "experiment": experiment, "variant": row.variant, "score": score}

    def report(self, name: str) -> dict[str, Any]:
        """Each variant side by side, candidates tested against the control, a verdict, the history."""
        experiment = self.get(name)
        r = t.experiment_responses
        with self.engine.connect() as conn:
            if self._postgres:  # one snapshot: a pruning between the two reads would count rows twice
                conn.execution_options(isolation_level="REPEATABLE READ")
            pruned = Pruned.from_dict(
                conn.execute(
                    select(t.experiments.c.pruned).where(t.experiments.c.id == experiment.id)
                ).scalar()
            )
            rows = conn.execute(
                select(*_RESPONSE_COLUMNS)
                .where(r.c.experiment_id == experiment.id)
                .order_by(r.c.at, r.c.response_id)
            ).all()
            samples = conn.execute(
                select(r.c.output)
                .where(r.c.experiment_id == experiment.id, r.c.shadow == 1, r.c.output.is_not(None))
                .order_by(r.c.at.desc())
                .limit(5)
            ).scalars()
            shadow_outputs = list(samples)
        history = self.history(experiment.id)
        out = summarize(experiment, rows, shadow_outputs, history, pruned)
        out["history"] = history
        out.update(judge(experiment, rows, out, pruned))
        return out

    def prune(self, name: str, *, at: datetime | None = None, experiment_id: int | None = None) -> int:
        """Apply an experiment's retention (the running one on ``name``, else its newest, or the
        one with ``experiment_id``): fold its oldest responses beyond ``max_age`` / ``max_responses``
        into its aggregates and delete them, never one younger than ``GRACE_SECONDS``; ``at``: now.
        How many were deleted (0 when it keeps everything)."""
        experiment = self.get(name, experiment_id=experiment_id)
        retention = experiment.settings.retention
        if not retention:
            return 0
        at = at or now()
        r = t.experiment_responses
        done = 0
        while True:
            with write_transaction(self.engine) as conn:
                # One pruning at a time per experiment (gateways prune concurrently).
                stored = conn.execute(
                    select(t.experiments.c.pruned)
                    .where(t.experiments.c.id == experiment.id)
                    .with_for_update()
                ).scalar()
                history = self.history(experiment.id)
                mine = r.c.experiment_id == experiment.id
                ripe = at - timedelta(seconds=GRACE_SECONDS)
                count = 0
                if retention.max_age is not None:
                    old = min(ripe, at - timedelta(seconds=retention.max_age))
                    count = conn.execute(select(func.count()).where(mine, r.c.at < old)).scalar() or 0
                if retention.max_responses is not None:
                    total = conn.execute(select(func.count()).where(mine)).scalar() or 0
                    eligible = conn.execute(select(func.count()).where(mine, r.c.at < ripe)).scalar() or 0
                    count = max(count, min(total - retention.max_responses, eligible))
                count = min(count, PRUNE_BATCH)
                if count <= 0:
                    return done
                rows = conn.execute(
                    select(r.c.response_id, *_RESPONSE_COLUMNS)
                    .where(mine, r.c.at < ripe)
                    .order_by(r.c.at, r.c.response_id)
                    .limit(count)
                    .with_for_update()
                ).all()
                folded = (Pruned.from_dict(stored) or Pruned()).fold(experiment, rows, history)
                ids = [row.response_id for row in rows]
                for i in range(0, len(ids), 500):
                    conn.execute(delete(r).where(r.c.response_id.in_(ids[i : i + 500])))
                conn.execute(
                    update(t.experiments)
                    .where(t.experiments.c.id == experiment.id)
                    .values(pruned=folded.to_dict())
                )
                done += len(rows)

    def prune_all(self, *, at: datetime | None = None) -> dict[str, int]:
        """Apply every experiment's retention, running or ended: {"tenant/name#id": deleted}."""
        out = {}
        for experiment in self.list():
            if experiment.settings.retention:
                deleted = self.prune(experiment.adapter, at=at, experiment_id=experiment.id)
                out[f"{experiment.adapter}#{experiment.id}"] = deleted
        return out

    @property
    def _postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def enforce(self, name: str) -> dict[str, Any] | None:
        """Apply the running experiment's own rules to what it has recorded: a breached guardrail
        stops it (traffic back to the control; actor ``guardrail``), a candidate that wins with
        every guardrail holding is promoted when ``auto_promote`` is on (actor ``auto-promote``).
        The decision taken (with its reason, kept in the history), or None. Several gateways may
        judge at once: whichever ends the experiment first wins, the others find it ended."""
        try:
            report = self.report(name)
        except NotFound:
            return None
        decision = report["decision"]
        if report["status"] != RUNNING or decision is None:
            return None
        if decision["decision"] == "promote" and not report.get("trustworthy", True):
            return None  # a sample ratio mismatch: no automatic promotion on broken assignment
        try:
            if decision["decision"] == "rollback":
                self.stop(name, actor="guardrail", reason=decision["reason"])
            else:
                self.promote(name, decision["variant"], actor="auto-promote", reason=decision["reason"])
        except NotFound:
            return None  # ended meanwhile, by another gateway or by hand
        except ExperimentError:  # e.g. the winner is the base: prod cannot point at it
            if decision["decision"] == "promote":
                return None
            raise
        return decision

    # -- internals -----------------------------------------------------------------------------

    def _running_for_update(self, conn: Connection, name: str) -> Experiment:
        adapter = parse_adapter(name)
        adapter_id = self.registry.adapter_id(conn, adapter, lock=True)
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
            .values(variants=_serialize(experiment.variants, experiment.shadow), updated_at=now())
        )

    def _end(self, conn: Connection, experiment: Experiment, status: str, winner: str | None) -> None:
        ended = now()
        conn.execute(
            update(t.experiments)
            .where(t.experiments.c.id == experiment.id)
            .values(status=status, winner=winner, updated_at=ended, ended_at=ended)
        )

    def _point_prod(self, conn: Connection, experiment: Experiment, variant: Variant) -> None:
        assert variant.ref is not None
        ref = parse_ref(variant.ref)
        adapter_id = self.registry.adapter_id(conn, ref)
        current = conn.execute(
            select(t.versions.c.version)
            .select_from(t.aliases.join(t.versions, t.versions.c.id == t.aliases.c.version_id))
            .where(and_(t.aliases.c.adapter_id == adapter_id, t.aliases.c.alias == DEFAULT_ALIAS))
        ).scalar()
        if current == ref.version:
            return
        info = self.registry.resolve(ref)
        version_id = self.registry.version_id(conn, info)
        self.registry.move_alias(conn, adapter_id, DEFAULT_ALIAS, version_id, info.version)

    def _event(self, conn: Connection, experiment_id: int, action: str, actor: str, detail: dict) -> None:
        conn.execute(
            t.experiment_events.insert().values(
                experiment_id=experiment_id, action=action, actor=actor, detail=detail, at=now()
            )
        )
