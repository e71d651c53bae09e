"""``adapterdeck registry ...``: publish, list, show, alias, pull, delete, import, gc."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="The adapter registry: tenants' adapters, versions and aliases.", no_args_is_help=True)
base_app = typer.Typer(help="Base models adapters may be published for.", no_args_is_help=True)
app.add_typer(base_app, name="base")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]
BaseOption = Annotated[str | None, typer.Option(help="The base model the adapter was trained on.")]


@app.callback()
def options(
    ctx: typer.Context,
    home: Annotated[Path | None, typer.Option(help="Registry home (env ADAPTERDECK_HOME).")] = None,
    database_url: Annotated[
        str | None, typer.Option("--db", help="SQLAlchemy URL (env ADAPTERDECK_DATABASE_URL).")
    ] = None,
    storage_url: Annotated[
        str | None, typer.Option("--storage", help="fsspec URL of the blobs (env ADAPTERDECK_STORAGE_URL).")
    ] = None,
) -> None:
    overrides = {"home": home, "database_url": database_url, "storage_url": storage_url}
    ctx.obj = {k: v for k, v in overrides.items() if v is not None}


def open_registry(ctx: typer.Context) -> Any:
    from adapterdeck.registry import Registry, RegistrySettings

    return Registry(RegistrySettings(**(ctx.obj or {})))


def dump(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _print_version(info: Any) -> None:
    # Method names, base paths and metrics come from the published files: print them, never as markup.
    served = ", ".join(info.served_by)
    out.print(
        f"[bold]{info.ref}[/bold]  {escape(info.method)} ({escape(info.peft_type)}), served by {served}"
    )
    rows = [
        ("base", f"{info.base} ({info.base_fingerprint[:19]}...)"),
        ("aliases", ", ".join(info.aliases) or "-"),
        ("size", f"{info.size_bytes:,} bytes in {len(info.files)} files"),
        ("rank", str(info.rank) if info.rank is not None else "-"),
        ("dataset", f"{info.data_format or '-'} {info.dataset_sha256 or ''}".strip()),
        ("created", info.created_at),
        ("source", info.source),
        ("parent", info.parent or "- (tuned from the base)"),
    ]
    for name, m in (info.metrics or {}).items():
        rows.append(
            (
                f"test {name}",
                f"base {m.get('base', {}).get('value')} -> tuned {m.get('tuned', {}).get('value')}",
            )
        )
    for key, value in rows:
        out.print(f"  {key:<16} {value}", highlight=False, markup=False)


@app.command()
def publish(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A run directory or an adapter directory.")],
    adapter: Annotated[str, typer.Argument(help="tenant/name")],
    alias: Annotated[str | None, typer.Option(help="Point this alias at the new version.")] = None,
    base: BaseOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Validate and publish an adapter as the next version of tenant/name."""
    info = open_registry(ctx).publish(path, adapter, alias=alias, base=base)
    if as_json:
        dump(info.to_dict())
    else:
        out.print(f"published [bold]{info.ref}[/bold]" + (f" (alias {alias})" if alias else ""))


@app.command("import")
def import_(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="An adapter directory saved with plain PEFT.")],
    adapter: Annotated[str, typer.Argument(help="tenant/name")],
    base: BaseOption = None,
    alias: Annotated[str | None, typer.Option(help="Point this alias at the new version.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Import an adapter trained elsewhere with plain PEFT (validated like any publish)."""
    info = open_registry(ctx).import_adapter(path, adapter, base=base, alias=alias)
    if as_json:
        dump(info.to_dict())
    else:
        out.print(f"imported [bold]{info.ref}[/bold], served by {', '.join(info.served_by)}")


@app.command()
def validate(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A run directory or an adapter directory.")],
    base: BaseOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Run every publish check without publishing: exit status 0 when it would be published, else
    every reason it would be refused (with --json: as a list, exit status 1)."""
    from adapterdeck.core.errors import AdapterdeckError
    from adapterdeck.registry.validate import PublishRefused

    try:
        candidate = open_registry(ctx).validate(path, base)
    except AdapterdeckError as exc:
        if not as_json:
            raise
        reasons = exc.reasons if isinstance(exc, PublishRefused) else [str(exc)]
        dump({"path": str(path), "ok": False, "reasons": reasons})
        raise typer.Exit(1) from None
    if as_json:
        dump(
            {
                "path": str(path),
                "ok": True,
                "reasons": [],
                "peft_type": candidate.peft_type,
                "method": candidate.method,
                "served_by": candidate.served_by,
                "rank": candidate.rank,
                "base": {"name": candidate.base.name, "fingerprint": candidate.base.fingerprint},
                "size_bytes": candidate.size_bytes,
                "files": [{"path": name, "size": size} for name, _, size in candidate.files],
            }
        )
        return
    served = ", ".join(candidate.served_by)
    out.print(f"ok: {candidate.peft_type} adapter for {candidate.base.name}, served by {served}")


@app.command("list")
def list_(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Argument(help="Only this tenant's adapters.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Adapters, their versions and aliases."""
    rows = open_registry(ctx).list(tenant)
    if as_json:
        dump(rows)
        return
    table = Table(
        "adapter", "versions", "latest", "aliases", "method", "served by", box=None, header_style="bold"
    )
    for r in rows:
        aliases = ", ".join(f"{a}->@{v}" for a, v in sorted(r["aliases"].items())) or "-"
        table.add_row(
            r["adapter"],
            str(len(r["versions"])),
            f"@{r['latest']}",
            aliases,
            r["method"],
            ", ".join(r["served_by"]),
        )
    out.print(table)


@app.command()
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="tenant/name, tenant/name@N or tenant/name:alias")],
    as_json: JsonFlag = False,
) -> None:
    """One version: what it is, where it can be served, its metrics and files."""
    reg = open_registry(ctx)
    info = reg.show(ref)
    if as_json:
        payload = info.to_dict()
        payload["alias_history"] = reg.alias_history(f"{info.tenant}/{info.name}")
        dump(payload)
        return
    _print_version(info)


@app.command()
def alias(
    ctx: typer.Context,
    adapter: Annotated[str, typer.Argument(help="tenant/name")],
    name: Annotated[str, typer.Argument(help="The alias, for example prod.")],
    version: Annotated[int, typer.Argument(help="The version it should point at.")],
) -> None:
    """Point tenant/name:ALIAS at version N (the move is kept in the history)."""
    info = open_registry(ctx).set_alias(adapter, name, version)
    out.print(f"{adapter}:{name} -> {info.ref}")


@app.command()
def pull(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="tenant/name, tenant/name@N or tenant/name:alias")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write (a plain PEFT adapter).")],
) -> None:
    """Download a version as a plain PEFT directory."""
    path = open_registry(ctx).pull(ref, out_dir)
    out.print(f"wrote {path}", markup=False)


@app.command()
def delete(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="tenant/name@N")]) -> None:
    """Delete one version (refused while an alias points at it)."""
    open_registry(ctx).delete(ref)
    out.print(f"deleted {ref}")


@app.command()
def gc(
    ctx: typer.Context,
    grace: Annotated[float, typer.Option(help="Keep unreferenced blobs younger than this (seconds).")] = 3600,
) -> None:
    """Remove blobs that no version references (left by interrupted publishes and deletes)."""
    result = open_registry(ctx).gc(grace)
    out.print(f"removed {result['removed']} blob(s), kept {result['kept']}")


@base_app.command("add")
def base_add(
    ctx: typer.Context, model: Annotated[str, typer.Argument(help="Local model dir or hub id.")]
) -> None:
    """Record a base model (its fingerprint of config, vocabulary and chat template)."""
    record = open_registry(ctx).add_base(model)
    out.print(f"base {record.name}: {record.fingerprint}")


@base_app.command("list")
def base_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The registry's base models."""
    bases = open_registry(ctx).bases()
    if as_json:
        dump([{"name": b.name, "fingerprint": b.fingerprint} for b in bases])
        return
    for b in bases:
        out.print(f"{b.name}  {b.fingerprint}", highlight=False)
