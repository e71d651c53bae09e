"""``adapterdeck experiment ...``: A/B experiments on a public name, straight on the registry database.

Gateways pick every change up within a second, with no restart.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from adapterdeck.registry.cli import JsonFlag, dump, open_registry, options, out

app = typer.Typer(
    help="A/B experiments: split tenant/name between adapter versions, compare, promote.",
    no_args_is_help=True,
)
app.callback()(options)

Name = Annotated[str, typer.Argument(help="The public name clients call, tenant/name.")]


def _store(ctx: typer.Context) -> Any:
    from adapterdeck.registry.experiments.store import Experiments

    return Experiments(open_registry(ctx))


def _print_definition(experiment: Any) -> None:
    data = experiment.to_dict()
    out.print(f"[bold]{data['name']}[/bold] experiment #{data['id']}: {data['status']}")
    for v in data["variants"]:
        out.print(f"  {v['role']:<9} {v['name']:<12} {v['ref'] or 'base':<28} {v['traffic']:>6.2f}%")
    if data["shadow"]:
        s = data["shadow"]
        out.print(f"  {'shadow':<9} {s['name']:<12} {s['ref'] or 'base':<28}  (copy of the traffic)")


@app.command()
def create(
    ctx: typer.Context,
    name: Name,
    control: Annotated[str, typer.Option(help="The control: vN, @N, base or tenant/name[@N|:alias].")],
    candidate: Annotated[
        list[str], typer.Option(help="REF=WEIGHT (weight in percent of the traffic); repeat for more.")
    ],
    shadow: Annotated[str | None, typer.Option(help="A variant that gets a copy of the traffic.")] = None,
    guardrail: Annotated[
        list[str] | None,
        typer.Option(
            help="METRIC=MARGIN: error_rate, latency_p95, completion_tokens or a live evaluator that "
            "must not get worse by more than MARGIN; a breach stops the experiment. Repeatable."
        ),
    ] = None,
    auto_promote: Annotated[
        bool, typer.Option(help="Promote the candidate once it wins on ratings and every guardrail holds.")
    ] = False,
    evaluate: Annotated[
        list[str] | None,
        typer.Option(help="A reference-free evaluator (e.g. json_valid) scored on live answers. Repeatable."),
    ] = None,
    eval_sample: Annotated[float, typer.Option(help="The share of answers the evaluators score.")] = 1.0,
    keep_for: Annotated[
        str | None,
        typer.Option(
            help="Keep each recorded response this long (seconds or 90s, 30m, 12h, 7d); older ones "
            "are folded into the aggregates and deleted."
        ),
    ] = None,
    keep_responses: Annotated[
        int | None, typer.Option(help="Keep at most this many recorded responses (the newest).")
    ] = None,
) -> None:
    """Start an experiment: the control gets the traffic the candidates' weights leave."""
    from adapterdeck.registry.experiments.model import (
        parse_candidate,
        parse_guardrail,
        parse_retention,
        parse_settings,
    )

    candidates = [parse_candidate(c) for c in candidate]
    settings = parse_settings(
        [parse_guardrail(g) for g in guardrail or []],
        auto_promote=auto_promote,
        evaluators=evaluate,
        eval_sample=eval_sample,
        retention=parse_retention(keep_for, keep_responses),
    )
    _print_definition(_store(ctx).create(name, control, candidates, shadow, settings=settings))


@app.command("set-weight")
def set_weight(
    ctx: typer.Context,
    name: Name,
    variant: Annotated[str, typer.Argument(help="The candidate: its name (v4) or ref.")],
    weight: Annotated[float, typer.Argument(help="Percent of the traffic.")],
) -> None:
    """Change a candidate's share; only users of the control move (into or out of it)."""
    _print_definition(_store(ctx).set_weight(name, variant, weight))


@app.command()
def promote(
    ctx: typer.Context,
    name: Name,
    variant: Annotated[str, typer.Argument(help="The winner: its name (v4) or ref.")],
) -> None:
    """Move the prod alias to VARIANT and end the experiment."""
    experiment = _store(ctx).promote(name, variant)
    winner = experiment.variant(experiment.winner)
    out.print(f"promoted {winner.name}: {name}:prod -> {winner.ref}; experiment ended")


@app.command()
def stop(ctx: typer.Context, name: Name) -> None:
    """End the experiment: all traffic goes back to the control."""
    experiment = _store(ctx).stop(name)
    out.print(f"stopped: all traffic of {name} goes to {experiment.control.name} again")


@app.command()
def prune(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this experiment (tenant/name).")] = None,
) -> None:
    """Apply the experiments' retention now (gateways do it every minute for running ones): fold
    responses older than it keeps into the aggregates and delete them; reports stay the same."""
    store = _store(ctx)
    if name is None:
        done = store.prune_all()
    else:
        experiment = store.get(name)
        done = {f"{experiment.adapter}#{experiment.id}": store.prune(name, experiment_id=experiment.id)}
    if not done:
        out.print("no experiment has a retention set (experiment create --keep-for / --keep-responses)")
    for which, deleted in done.items():
        out.print(f"{which}: {deleted} responses folded into the aggregates and deleted")


@app.command("list")
def list_(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Argument(help="Only this tenant's experiments.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Every experiment, running or ended."""
    rows = _store(ctx).list(tenant)
    if as_json:
        dump([e.to_dict() for e in rows])
        return
    table = Table("id", "name", "status", "variants", "winner", "created", box=None, header_style="bold")
    for e in rows:
        split = ", ".join(f"{v.name} {v.weight:g}%" for v in e.variants)
        table.add_row(str(e.id), e.adapter, e.status, split, e.winner or "-", e.created_at[:19])
    out.print(table)


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


@app.command()
def show(ctx: typer.Context, name: Name, as_json: JsonFlag = False) -> None:
    """Each variant side by side, with a significance test on feedback and errors, and a verdict."""
    report = _store(ctx).report(name)
    if as_json:
        dump(report)
        return
    out.print(f"[bold]{report['name']}[/bold] experiment #{report['id']}: {report['status']}")
    variants = report["variants"]
    # Variants side by side: one column each, one row per figure.
    table = Table("", *(f"{v['name']} ({v['role']})" for v in variants), box=None, header_style="bold")

    def row(label: str, cell: Any) -> None:
        table.add_row(label, *(cell(v) for v in variants))

    def test(v: dict[str, Any], key: str) -> str:
        return _fmt((v.get("vs_control") or {}).get(key), ".3g")

    def seq(v: dict[str, Any], what: str) -> str:
        figures = (v.get("vs_control") or {}).get("sequential")
        if not figures:
            return "-"
        ci = figures.get(f"{what}_ci")
        interval = f" [{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else ""
        return f"{_fmt(figures.get(f'{what}_p'), '.3g')}{interval}"

    row("ref", lambda v: v["ref"] or "base")
    row("traffic", lambda v: f"{v['weight']:g}%")
    row("requests", lambda v: str(v["requests"]))
    row("errors", lambda v: f"{v['errors']} ({_fmt(v['error_rate'], '.1%')})")
    row("latency p50/p95", lambda v: f"{_fmt(v['latency_ms_p50'])} / {_fmt(v['latency_ms_p95'])} ms")
    row("tokens in/out", lambda v: f"{v['prompt_tokens']} / {v['completion_tokens']}")
    row("ratings", lambda v: str(v["feedback"]))
    row("mean score", lambda v: _fmt(v["mean_score"], ".3f"))
    row("p, 95% CI (score)", lambda v: seq(v, "feedback"))
    row("p, 95% CI (errors)", lambda v: seq(v, "errors"))
    row("fixed-horizon p (score)", lambda v: test(v, "feedback_p"))
    live = report.get("live_evaluators", {})
    for evaluator in report.get("settings", {}).get("evaluators", []):
        row(
            f"{evaluator} (live)",
            lambda v, e=evaluator: _fmt((live.get(v["name"], {}).get(e) or {}).get("mean"), ".3f"),
        )
    out.print(table)
    out.print("  (p and CI: always-valid, read them at any time; fixed-horizon p: valid read once)")
    for g in report.get("guardrails", []):
        ci = f", CI {g['ci']}" if g.get("ci") else ""
        out.print(
            f"guardrail {g['metric']} (margin {g['margin']:g}) on {g['variant']}: {g['status']} "
            f"({_fmt(g['value'])} against {_fmt(g['control_value'])}{ci})"
        )
    srm = report.get("srm") or {}
    if srm.get("p") is not None:
        out.print(
            f"sample ratio: p={srm['p']:.3g}{' MISMATCH' if srm['mismatch'] else ' (as the weights say)'}"
        )
    elif srm.get("note"):
        out.print(f"sample ratio: not tested ({srm['note']})")
    if report.get("pruned"):
        kept = report["pruned"]
        out.print(
            f"retention: {kept['responses']} responses up to {kept['through']} folded into the "
            "aggregates (the figures include them)"
        )
    if report.get("shadow"):
        s = report["shadow"]
        out.print(
            f"shadow {s['name']} ({s['ref'] or 'base'}): {s['requests']} copies, {s['errors']} errors, "
            f"p50 {_fmt(s['latency_ms_p50'])} ms"
        )
    out.print(f"[bold]verdict:[/bold] {report['verdict']}")
