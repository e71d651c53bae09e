"""``adapterdeck serve``, ``adapterdeck worker`` and ``adapterdeck tenant ...``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from adapterdeck.registry import Registry
    from adapterdeck.serve.finetune.local import LocalWorkers
    from adapterdeck.serve.settings import ServeSettings

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
        list[str] | None,
        typer.Option(
            help="Use this running vLLM server instead of starting one; repeat it for several replicas."
        ),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(
            min=1, help="vLLM servers to start here (default 1), each on its share of cores or GPUs."
        ),
    ] = None,
    vllm_port: Annotated[
        int | None, typer.Option(help="Port for the (first) vLLM server started here.")
    ] = None,
    served_name: Annotated[str | None, typer.Option(help="Model name of the base on the API.")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="vLLM --max-model-len.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="vLLM --dtype (auto: bf16 on most CPUs and GPUs).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Fine-tuning workers to start here (default 1; 0: none).")
    ] = None,
) -> None:
    """Serve the base and every adapter in the registry behind an OpenAI-compatible API."""
    import uvicorn

    from adapterdeck.registry.private import private_dir, private_umask
    from adapterdeck.serve.app import create_app
    from adapterdeck.serve.httpguard import guarded_protocol
    from adapterdeck.serve.settings import load_serve_settings

    private_umask()  # logs, uploads, vLLM's files: every tenant's data, readable by this user only

    settings = load_serve_settings(
        config,
        {
            "base": base,
            "host": host,
            "port": port,
            "served_name": served_name,
            "vllm.url": vllm_url[0] if vllm_url else None,
            "vllm.urls": vllm_url[1:] if vllm_url else None,
            "vllm.replicas": replicas,
            "vllm.port": vllm_port,
            "vllm.max_model_len": max_model_len,
            "vllm.dtype": dtype,
            "finetune.workers": workers,
        },
    )
    _check_vllm(settings)
    location = settings.registry
    registry = _registry(location.home, location.database_url, location.storage_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per proxied request
    log_dir = private_dir(registry.settings.home.expanduser() / "logs")
    app = create_app(settings, registry, log_dir=log_dir)
    out.print(f"serving {settings.base_name()} on http://{settings.host}:{settings.port}/v1")
    local_workers = _start_local_workers(settings, registry)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level="info",
            http=guarded_protocol(settings.http),  # bounded headers and read timeouts
            access_log=False,  # a log line per request costs more than the gateway's own work
            # Longer than clients' idle timeouts (httpx: 5 s), so a client never sends a request on
            # a connection the server is closing at that moment (a ReadError on the client).
            timeout_keep_alive=75,
            timeout_graceful_shutdown=30,
        )
    finally:
        if local_workers is not None:
            local_workers.stop()


def _check_vllm(settings: ServeSettings) -> None:
    """Refuse on one line, before anything starts, a taken port of a vLLM to start (not a vLLM that
    keeps failing to start) and a --vllm-url that answers but is not a vLLM serving this base."""
    from adapterdeck.serve.engines.process import check_vllm_port
    from adapterdeck.serve.engines.vllm import VLLM_KEY_ENV
    from adapterdeck.serve.fleet.probe import check_endpoints

    check_vllm_port(settings)
    key = settings.vllm.api_key or os.environ.get(VLLM_KEY_ENV)
    for url in check_endpoints(settings, key):
        out.print(f"vLLM at {url} does not answer yet: it serves once it does (and is checked then)")


def _start_local_workers(settings: ServeSettings, registry: Registry) -> LocalWorkers | None:
    """``settings.finetune.workers`` fine-tuning workers on this machine, on the gateway's registry."""
    from adapterdeck.serve.finetune.local import LocalWorkers

    if not settings.finetune.workers:
        return None
    location = registry.settings
    workers = LocalWorkers(settings, location.child_env(), location.home.expanduser() / "logs")
    workers.start()
    out.print(f"{settings.finetune.workers} fine-tuning worker(s) started (logs: {workers.log_dir})")
    return workers


def worker(
    config: Annotated[
        Path | None, typer.Option(help="YAML settings file (the one `serve` reads); flags override it.")
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(help="Train only jobs for this base (local dir or hub id); default: each job's base."),
    ] = None,
    served_name: Annotated[
        str | None, typer.Option(help="The base's model name on the API, when not derived from --base.")
    ] = None,
    settings_json: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run queued fine-tuning jobs from the registry, one at a time, until stopped (Ctrl-C, SIGTERM)."""
    import signal

    from adapterdeck.registry.private import private_umask
    from adapterdeck.serve.finetune.parent import die_with_parent
    from adapterdeck.serve.finetune.worker import Worker
    from adapterdeck.serve.settings import WorkerSettings, load_serve_settings

    die_with_parent()
    private_umask()  # tenants' training data and runs, readable by this user only
    if settings_json is not None:  # from `adapterdeck serve`: its exact settings
        settings = WorkerSettings.model_validate_json(settings_json)
    else:
        settings = load_serve_settings(
            config, {"base": base, "served_name": served_name}, model=WorkerSettings
        )
    location = settings.registry
    registry = _registry(location.home, location.database_url, location.storage_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    runner = Worker(
        registry,
        settings.finetune,
        base=settings.base,
        base_name=settings.base_name() if settings.base else None,
    )

    def _stop(signum: int, _frame: object) -> None:
        logging.getLogger("adapterdeck.worker").info("stopping (signal %d)", signum)
        runner.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        runner.run()
    finally:
        registry.close()


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
def revoke(
    prefix: Annotated[str, typer.Argument(help="The key, or at least its first 10 characters.")],
) -> None:
    """Revoke an API key (it stops working within 10 seconds). A prefix that matches no key is an error."""
    from adapterdeck.registry.tenants import revoke_key

    out.print(f"revoked {revoke_key(_registry(), prefix)} key(s)")
