"""``adapterdeck serve`` settings: a YAML file, overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapterdeck.core.errors import AdapterdeckError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VllmSettings(Strict):
    url: str | None = Field(
        None, description="use a vLLM server already running here instead of starting one"
    )
    urls: list[str] = Field(
        default_factory=list, description="more vLLM servers already running (replicas), beside `url`"
    )
    replicas: int = Field(
        1,
        ge=1,
        description="vLLM servers the gateway starts (ports port, port+1, ...); none by default "
        "when `url` or `urls` name running ones",
    )
    port: int = Field(8100, description="port of the (first) vLLM server the gateway starts (loopback only)")
    max_loras: int = Field(8, ge=1, description="adapters in one batch")
    max_cpu_loras: int = Field(32, ge=1, description="adapters kept loaded in CPU memory")
    max_lora_rank: int = Field(64, ge=1, description="largest rank served; the registry refuses larger")
    max_model_len: int | None = None
    dtype: str = "auto"
    kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE (GiB) on CPU machines")
    # vLLM keeps every core busy; at a lower priority it yields at once to the gateway, whose
    # work per request is small but on the latency path (bench/serving.py: at concurrency 1 the
    # gateway reaches 0.96-0.97x direct vLLM with 5, 0.93x with 0).
    nice: int = Field(
        5,
        ge=0,
        le=19,
        description="run vLLM at this lower CPU priority, so the gateway (light, latency-bound) on the "
        "same cores is scheduled at once",
    )
    api_key: str | None = Field(
        None,
        description="the API key of the vLLM server at `url` (else ADAPTERDECK_VLLM_API_KEY); a vLLM "
        "the gateway starts gets a new random key at every start",
    )
    extra_args: list[str] = Field(default_factory=list)
    startup_timeout: float = 900
    restart_backoff: float = 2.0

    def endpoints(self) -> list[str]:
        """The running vLLM servers named by ``url`` and ``urls``, each once, in that order."""
        named = [u.rstrip("/") for u in ([self.url] if self.url else []) + self.urls]
        return list(dict.fromkeys(named))

    def local_replicas(self) -> int:
        """How many vLLM servers the gateway starts: ``replicas``, but none by default beside
        running ones (``replicas`` set explicitly starts that many besides them)."""
        return self.replicas if not self.endpoints() or "replicas" in self.model_fields_set else 0


class FleetSettings(Strict):
    """How requests are spread over the vLLM replicas (``serve/fleet/router.py``)."""

    policy: Literal["affinity", "round_robin", "least_loaded"] = Field(
        "affinity",
        description="how a replica is chosen: affinity (below); round_robin and least_loaded are baselines",
    )
    k_min: int = Field(1, ge=1, description="replicas each adapter is placed on at least")
    k_max: int = Field(4, ge=1, description="replicas a hot adapter spreads to at most")
    load_factor: float = Field(
        0.5, gt=0, description="bounded load: no replica above (1 + this) x the mean in-flight requests"
    )
    cold_load_factor: float = Field(
        1.0,
        gt=0,
        description="a replica that holds the adapter may go up to (1 + this) x the mean before a request "
        "is sent to one that would have to load it",
    )
    batch_slots: bool = Field(
        True,
        description="prefer a replica where the adapter can run at once: its requests run there, or one of "
        "vLLM's max_loras batch slots is free (else it waits in that replica's queue)",
    )
    spread_load: float = Field(
        4.0,
        gt=0,
        description="an adapter whose mean in-flight requests per replica pass this spreads to one more",
    )
    shrink_load: float = Field(
        1.0, ge=0, description="... and gives one back when they would stay under this with one replica less"
    )
    shrink_after: float = Field(
        30.0, ge=0, description="seconds an adapter keeps a replica before giving it back"
    )
    load_window: float = Field(5.0, gt=0, description="seconds of the moving average of an adapter's load")
    health_interval: float = Field(
        0.5,
        gt=0,
        le=0.5,
        description="seconds between health checks of each replica (a dead one is out at once)",
    )
    metrics_interval: float = Field(
        5.0, gt=0, description="seconds between reads of each replica's /metrics (the adapters it runs)"
    )
    pin_refresh_seconds: float = Field(
        10.0, gt=0, description="how often pinned aliases are checked for a move (then warmed)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> FleetSettings:
        if self.k_max < self.k_min:
            raise ValueError("k_max must be at least k_min")
        if self.cold_load_factor < self.load_factor:
            raise ValueError("cold_load_factor must be at least load_factor")
        if self.shrink_load >= self.spread_load:
            raise ValueError("shrink_load must be below spread_load (the hysteresis)")
        return self


class LimitSettings(Strict):
    """Per-tenant limits (None: unlimited); over a limit a request gets 429 with Retry-After."""

    requests_per_minute: int | None = Field(None, ge=1, description="requests per minute (moving window)")
    concurrent_requests: int | None = Field(None, ge=1, description="completions in flight at once")


class LimitStorage(Strict):
    """Where the per-tenant limits are counted: ``memory://``, each gateway alone (the traffic it
    sees), or ``redis://HOST:PORT/DB``, every gateway that names the same Redis together."""

    url: str = Field("memory://", description="memory:// (each gateway alone) or redis://HOST:PORT/DB")
    key_prefix: str = Field("adapterdeck", min_length=1, description="prefix of the limits' Redis keys")
    timeout: float = Field(0.25, gt=0, description="seconds a Redis call may take (slower: an outage)")
    lease_seconds: float = Field(
        10.0, gt=0, description="a concurrency slot its gateway stopped renewing is free after this long"
    )
    on_outage: Literal["local", "refuse"] = Field(
        "local",
        description="Redis unreachable: `local`, each gateway enforces the limits alone; `refuse`, 503",
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if url != "memory://" and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be memory://, redis://HOST:PORT/DB, rediss://... or unix://PATH")
        return url


class HttpSettings(Strict):
    """Bounds on one client's request, so no client can stall the gateway or hold its sockets."""

    max_head_bytes: int = Field(
        64 * 1024, ge=1024, description="largest request line and headers, in bytes (431 above)"
    )
    max_headers: int = Field(100, ge=8, description="most request headers (431 above)")
    head_timeout: float = Field(
        10.0, gt=0, description="seconds a client has to send its request line and headers (408 after)"
    )
    body_timeout: float = Field(
        10.0, gt=0, description="a request body is measured over each this many seconds ..."
    )
    body_min_rate: int = Field(
        1024, ge=1, description="... and must arrive at this many bytes a second or more (else disconnected)"
    )


class RegistryLocation(Strict):
    home: Path | None = None
    database_url: str | None = None
    storage_url: str | None = None


class FineTuneSettings(Strict):
    workers: int = Field(1, ge=0, description="fine-tuning workers `adapterdeck serve` starts here (0: none)")
    max_file_bytes: int = Field(512 * 1024**2, ge=1, description="largest training file accepted, in bytes")
    heartbeat_seconds: float = Field(2.0, gt=0, description="how often a worker renews its job's lease")
    lease_seconds: float = Field(
        30.0, gt=0, description="a job whose worker has not heartbeated this long is requeued or failed"
    )
    max_attempts: int = Field(2, ge=1, description="tries of a job whose workers keep dying, then failed")
    poll_seconds: float = Field(1.0, gt=0, description="how often an idle worker looks for queued jobs")
    stop_grace_seconds: float = Field(3.0, ge=0, description="SIGTERM to SIGKILL of a stopped training")
    devices_per_job: int = Field(
        1,
        ge=1,
        description="processes each job trains in, data-parallel (CPUs: gloo, each its share of the "
        "cores; GPUs: one device each)",
    )
    devices: list[str] | None = Field(
        None,
        description="the GPUs this machine's workers train on (CUDA_VISIBLE_DEVICES ids); the n-th "
        "worker takes the n-th group of devices_per_job of them; none: every GPU (or the CPU)",
    )
    workdir: Path | None = Field(None, description="where workers train; default: <registry home>/finetune")
    mlflow_tracking_uris: list[str] = Field(
        default_factory=list,
        description="MLflow tracking URIs a job's mlflow integration may log to; the first is the default",
    )


class ServeSettings(Strict):
    base: str = Field(description="the base model: local directory or hub id")
    served_name: str | None = Field(None, description="the name clients use for the base; default: derived")
    host: str = "127.0.0.1"
    port: int = 8000
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    registry: RegistryLocation = Field(default_factory=RegistryLocation)
    limits: LimitSettings = Field(default_factory=LimitSettings, description="every tenant's limits")
    tenant_limits: dict[str, LimitSettings] = Field(
        default_factory=dict, description="limits of named tenants, replacing `limits` for them"
    )
    limits_storage: LimitStorage = Field(
        default_factory=LimitStorage, description="where limits are counted: each gateway, or all in Redis"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest JSON request body")
    max_upload_bytes: int = Field(512 << 20, ge=1024, description="largest upload (adapter files, files)")
    max_tokens: int | None = Field(
        None, ge=1, description="largest max_tokens a request may ask for (default: the model length)"
    )
    max_n: int = Field(8, ge=1, description="largest n (choices per request)")
    max_choices: int = Field(
        32, ge=1, description="largest number of choices one request asks for: prompts times n (400 above)"
    )
    http: HttpSettings = Field(default_factory=HttpSettings)
    peft_max_batch: int = Field(8, ge=1, description="embedded PEFT engine: requests per batch")
    peft_batch_wait_ms: float = Field(10, ge=0, description="embedded PEFT engine: wait to fill a batch")
    peft_max_adapters: int = Field(
        16, ge=1, description="embedded PEFT engine: adapters held in memory (least recently used go)"
    )
    finetune: FineTuneSettings = Field(default_factory=FineTuneSettings)
    ui: bool = Field(True, description="the web dashboard at /ui (false: no /ui routes at all)")

    def base_name(self) -> str:
        """The model name of the base on the API: the hub id, or a local directory's name."""
        if self.served_name:
            return self.served_name
        path = Path(self.base)
        return path.name if path.exists() else self.base


class WorkerSettings(ServeSettings):
    """``adapterdeck worker`` reads the same file as ``serve``; without a base it trains each job on
    the base the gateway recorded, with one it takes only jobs for that base's served name."""

    base: str | None = None  # type: ignore[assignment]


S = TypeVar("S", bound=ServeSettings)


def load_serve_settings(
    config_file: Path | None,
    overrides: dict[str, Any],
    model: type[S] = ServeSettings,  # type: ignore[assignment]
) -> S:
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise AdapterdeckError(f"cannot read {config_file}: {exc}") from exc
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise AdapterdeckError(f"{config_file or 'serve settings'}:\n  " + "\n  ".join(lines)) from None
