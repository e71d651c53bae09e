"""The registry as an adapterdeck plugin: its CLI commands, publishing runs (``publish:``) and
fetching the adapter a run continues from (``init_adapter:``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterdeck.core import hookimpl


@hookimpl
def register_commands(cli: Any) -> None:
    from adapterdeck.registry.cli import app
    from adapterdeck.registry.experiments.cli import app as experiment_app
    from adapterdeck.registry.fleet.cli import register as register_pins

    register_pins(app)
    cli.add_typer(app, name="registry")
    cli.add_typer(experiment_app, name="experiment")


@hookimpl
def publish_run(run_dir: Path, ref: str, alias: str | None) -> str | None:
    from adapterdeck.registry import Registry

    registry = Registry()
    try:
        return registry.publish(run_dir, ref, alias=alias).ref
    finally:
        registry.close()


@hookimpl
def fetch_adapter(ref: str) -> tuple[str, Path] | None:
    from adapterdeck.registry import Registry

    registry = Registry()
    try:
        info = registry.resolve(ref)
        return info.ref, registry.materialize(info)
    finally:
        registry.close()
