"""``adapterdeck registry pin``, ``unpin`` and ``pins``: pinned aliases, straight on the registry
database. Every gateway sharing it picks a change up within ``fleet.pin_refresh_seconds``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.formats import shown
from adapterdeck.registry.cli import JsonFlag, dump, open_registry, out

AliasRef = Annotated[
    str, typer.Argument(help="tenant/name:alias (a bare tenant/name: its prod alias)", show_default=False)
]


def _pins(ctx: typer.Context) -> Any:
    from adapterdeck.registry.fleet.pins import Pins

    return Pins(open_registry(ctx))


def _replicas(value: str | None) -> int | None:
    """The ``--replicas`` value, read here so a bad one is one line of error like any other."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise AdapterdeckError(f"--replicas must be a whole number from 1 up, got {shown(value)}")
    return int(value)


def _where(pin: Any) -> str:
    count = f"{pin.replicas} replica(s)" if pin.replicas is not None else "the router's k replicas"
    return f"{pin.ref or 'no version'}, on {count}"


def pin(
    ctx: typer.Context,
    alias_ref: AliasRef,
    replicas: Annotated[
        str | None,
        typer.Option(
            "--replicas", metavar="K", help="Keep it loaded on K replicas (default: the router's k)."
        ),
    ] = None,
) -> None:
    """Keep the version tenant/name:ALIAS points at loaded on the replicas, so no request is cold."""
    done = _pins(ctx).pin(alias_ref, _replicas(replicas))
    out.print(f"pinned {done.pin} -> {_where(done)}", markup=False, highlight=False)


def unpin(ctx: typer.Context, alias_ref: AliasRef) -> None:
    """Stop keeping tenant/name:ALIAS loaded: it is loaded on first use and evicted like any other."""
    done = _pins(ctx).unpin(alias_ref)
    out.print(f"unpinned {done.pin}", markup=False, highlight=False)


def pins(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Argument(help="Only this tenant's pins.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The pinned aliases, each with the version it points at now and its replica count."""
    rows = _pins(ctx).list(tenant)
    if as_json:
        dump([p.to_dict() for p in rows])
        return
    table = Table("pin", "version", "replicas", "by", "since", box=None, header_style="bold")
    for p in rows:
        count = str(p.replicas) if p.replicas is not None else "router's k"
        table.add_row(p.pin, p.ref or "-", count, p.created_by, p.created_at[:19])
    out.print(table)


COMMANDS = {"pin": pin, "unpin": unpin, "pins": pins}


def register(app: typer.Typer) -> None:
    """Add the commands to ``adapterdeck registry`` (once, however often the plugins load)."""
    present = {info.name for info in app.registered_commands}
    for name, command in COMMANDS.items():
        if name not in present:
            app.command(name)(command)
