"""Serving as an adapterdeck plugin: the ``serve``, ``worker``, ``tenant`` and ``demo`` commands."""

from __future__ import annotations

from typing import Any

from adapterdeck.core import hookimpl


@hookimpl
def register_commands(cli: Any) -> None:
    from adapterdeck.serve.cli import serve, tenant_app, worker
    from adapterdeck.serve.demo import app as demo_app

    cli.command()(serve)
    cli.command()(worker)
    cli.add_typer(tenant_app, name="tenant")
    cli.add_typer(demo_app, name="demo")
