"""``adapterdeck serve`` and ``adapterdeck tenant ...``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console(soft_wrap=True)
tenant_app = typer.Typer(help="Tenants and API keys.", no_args_is_help=True)


def _registry(home: Path | None = None, database_url: str | None = None, storage_url: str | None = None):
    from adapterdeck.registry import Registry, RegistrySettings

    overrides = {"home": home, "database_url": database_url, "storage_url": storage_url}
    return Registry(RegistrySettings(**{k: v for k, v in overrides.items() if v is not None}))


def serve(
    base: Annotated[str | None, typer.Option(help="Base model: local dir or hub id.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML settings file; flags override it.")] = None,
    vllm_url: Annotated[
        str | None, typer.Option(help="Use this running vLLM server instead of starting one.")
    ] = None,
    vllm_port: Annotated[int | None, typer.Option(help="Port for the vLLM server started here.")] = None,
    served_name: Annotated[str | None, typer.Option(help="Model name of the base on the API.")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="vLLM --max-model-len.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="vLLM --dtype (auto: bf16 on most CPUs and GPUs).")
    ] = None,
) -> None:
    """Serve the base and every adapter in the registry behind an OpenAI-compatible API."""
    import uvicorn

    from adapterdeck.serve.gateway import create_app
    from adapterdeck.serve.settings import load_serve_settings

    settings = load_serve_settings(
        config,
        {
            "base": base,
            "host": host,
            "port": port,
            "served_name": served_name,
            "vllm.url": vllm_url,
            "vllm.port": vllm_port,
            "vllm.max_model_len": max_model_len,
            "vllm.dtype": dtype,
        },
    )
    location = settings.registry
    registry = _registry(location.home, location.database_url, location.storage_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per proxied request
    app = create_app(settings, registry, log_dir=registry.settings.home.expanduser() / "logs")
    out.print(f"serving {settings.base_name()} on http://{settings.host}:{settings.port}/v1")
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,  # a log line per request costs more than the gateway's own work
        timeout_graceful_shutdown=30,
    )


@tenant_app.command("create")
def tenant_create(name: Annotated[str, typer.Argument(help="The tenant's name.")]) -> None:
    """Create a tenant (if new) and an API key for it. The key is shown once, on the last line."""
    from adapterdeck.registry.tenants import create_key

    key = create_key(_registry(), name)
    out.print(f"tenant {name}: new API key (shown once, stored hashed):")
    print(key)


@tenant_app.command("admin-key")
def admin_key() -> None:
    """Create an admin API key (publish and move aliases over HTTP). Shown once, on the last line."""
    from adapterdeck.registry.tenants import create_key

    key = create_key(_registry(), None)
    out.print("new admin API key (shown once, stored hashed):")
    print(key)


@tenant_app.command("revoke")
def revoke(prefix: Annotated[str, typer.Argument(help="The key, or its first 10 characters.")]) -> None:
    """Revoke an API key."""
    from adapterdeck.registry.tenants import revoke_key

    out.print(f"revoked {revoke_key(_registry(), prefix)} key(s)")
