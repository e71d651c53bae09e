"""The registry's tables (SQLAlchemy Core). Changes go through a migration in ``migrations/``."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(40), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

bases = Table(
    "bases",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False),
    Column("fingerprint", String(80), nullable=False, unique=True),
    # The base's model config: module shapes for checking adapters without loading weights.
    Column("config", JSON, nullable=False),
    Column("chat_template_sha256", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

adapters = Table(
    "adapters",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("tenant_id", Integer, ForeignKey("tenants.id"), nullable=False),
    Column("name", String(64), nullable=False),
    # Version numbers are never reused, even after a delete.
    Column("last_version", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("tenant_id", "name", name="uq_adapters_tenant_name"),
)

versions = Table(
    "versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("adapter_id", Integer, ForeignKey("adapters.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("manifest_sha256", String(64), nullable=False),
    Column("base_id", Integer, ForeignKey("bases.id"), nullable=False),
    Column("peft_type", String(40), nullable=False),
    Column("method", String(64), nullable=False),
    Column("params", JSON, nullable=False),
    Column("served_by", JSON, nullable=False),
    Column("rank", Integer),
    Column("dataset_sha256", String(64)),
    Column("data_format", String(64)),
    Column("metrics", JSON),
    Column("chat_template_sha256", String(64)),
    Column("size_bytes", BigInteger, nullable=False),
    Column("library_versions", JSON),
    Column("report_sha256", String(64)),  # the run's report.json, a blob (None: published without one)
    Column("parent", String(300)),  # the tenant/name@N it was tuned from (None: from the base)
    Column("source", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("adapter_id", "version", name="uq_versions_adapter_version"),
)

version_files = Table(
    "version_files",
    metadata,
    Column("version_id", Integer, ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True),
    Column("path", String(255), primary_key=True),
    Column("sha256", String(64), nullable=False, index=True),
    Column("size", BigInteger, nullable=False),
)

aliases = Table(
    "aliases",
    metadata,
    Column("adapter_id", Integer, ForeignKey("adapters.id"), primary_key=True),
    Column("alias", String(32), primary_key=True),
    Column("version_id", Integer, ForeignKey("versions.id"), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

alias_events = Table(
    "alias_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("adapter_id", Integer, ForeignKey("adapters.id"), nullable=False, index=True),
    Column("alias", String(32), nullable=False),
    Column("old_version", Integer),
    Column("new_version", Integer),
    Column("at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    # NULL for an admin key.
    Column("tenant_id", Integer, ForeignKey("tenants.id")),
    Column("key_sha256", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("role", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
)

# -- A/B experiments -----------------------------------------------------------------------------

EXPERIMENT_RUNNING, EXPERIMENT_STOPPED, EXPERIMENT_PROMOTED = "running", "stopped", "promoted"

experiments = Table(
    "experiments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("adapter_id", Integer, ForeignKey("adapters.id"), nullable=False, index=True),
    # running, stopped or promoted; at most one running experiment per public name.
    Column("status", String(16), nullable=False),
    # {"variants": [...], "shadow": ... or null}: each variant's name, immutable ref (null for the
    # base), role, weight and the 10,000 assignment buckets it owns (see registry/experiments/).
    Column("variants", JSON, nullable=False),
    Column("shadow", String(200)),
    Column("winner", String(200)),
    Column("created_by", String(40), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    # {"guardrails": [{"metric": ..., "margin": ...}], "auto_promote": bool, "evaluators": [...],
    # "eval_sample": fraction, "retention": {...}} (see registry/experiments/model.py); null: none.
    Column("settings", JSON),
    # What retention kept of the responses it deleted (registry/experiments/retention.py); null:
    # nothing deleted.
    Column("pruned", JSON),
)

experiment_events = Table(
    "experiment_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("experiment_id", Integer, ForeignKey("experiments.id"), nullable=False, index=True),
    Column("action", String(32), nullable=False),
    Column("actor", String(40), nullable=False),
    Column("detail", JSON, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
)

# One row per request an experiment served (or shadowed); feedback lands on the row.
experiment_responses = Table(
    "experiment_responses",
    metadata,
    Column("response_id", String(128), primary_key=True),
    Column("experiment_id", Integer, ForeignKey("experiments.id"), nullable=False, index=True),
    Column("variant", String(200), nullable=False),
    Column("shadow", Integer, nullable=False, default=0),
    Column("status", Integer, nullable=False),
    Column("latency_ms", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    # Only a shadow variant's answers are kept (they are never returned to the client).
    Column("output", Text),
    Column("score", Float),
    Column("feedback_at", DateTime(timezone=True)),
    Column("at", DateTime(timezone=True), nullable=False),
    # {evaluator: score} of the experiment's live evaluators, for the sampled answers; else null.
    Column("evals", JSON),
)

# -- fine-tuning ---------------------------------------------------------------------------------
# Uploaded training files, fine-tuning jobs with their events and checkpoints (OpenAI's API shape;
# see registry/finetune/). ``seq`` orders rows for cursor pagination; ``id`` is the public id.

ft_files = Table(
    "ft_files",
    metadata,
    Column("seq", Integer, primary_key=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("tenant_id", Integer, ForeignKey("tenants.id"), nullable=False, index=True),
    Column("filename", String(255), nullable=False),
    # fine-tune (uploaded) or fine-tune-results (a job's report).
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    # What validation found: the data format and the number of examples.
    Column("format", String(64)),
    Column("examples", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

ft_jobs = Table(
    "ft_jobs",
    metadata,
    Column("seq", Integer, primary_key=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("tenant_id", Integer, ForeignKey("tenants.id"), nullable=False, index=True),
    # validating_files, queued, running, succeeded, failed or cancelled.
    Column("status", String(24), nullable=False, index=True),
    # The base's served name, and the base as the gateway loads it (a directory or a hub id).
    Column("model", Text, nullable=False),
    Column("base", Text, nullable=False),
    Column("training_file", String(40), nullable=False),
    Column("validation_file", String(40)),
    Column("suffix", String(64)),
    Column("seed", Integer, nullable=False),
    # n_epochs, batch_size, learning_rate_multiplier: as asked ("auto" allowed), resolved at start.
    Column("hyperparameters", JSON, nullable=False),
    # The method plugin and its parameters ({"name": "lora", "r": 8}), and the evaluators.
    Column("adapter_method", JSON, nullable=False),
    # The objective plugin and its parameters ({"name": "dpo", "beta": 0.1}); null: sft.
    Column("objective", JSON),
    # The fine-tuned model the job continues: {"model": "ft:...", "ref": "tenant/ft-...@N"}; null: the base.
    Column("parent", JSON),
    # OpenAI's integrations as the job was created with them ([{"type": "mlflow", "mlflow": {...}}]).
    Column("integrations", JSON),
    Column("evaluators", JSON, nullable=False),
    Column("user_metadata", JSON),
    Column("fine_tuned_model", String(255), unique=True),
    # The immutable registry ref the fine-tuned model name stands for.
    Column("result_ref", String(200)),
    Column("result_files", JSON, nullable=False),
    Column("trained_tokens", BigInteger),
    Column("error", JSON),
    # Claiming and recovery: who runs it, until when its lease holds, how many tries so far.
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("worker_id", String(200)),
    Column("heartbeat_at", DateTime(timezone=True)),
    Column("lease_expires_at", DateTime(timezone=True)),
    # Set once the worker starts publishing the result: from then on a cancel is refused.
    Column("publishing", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("estimated_finish", DateTime(timezone=True)),
)

ft_job_events = Table(
    "ft_job_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", String(40), ForeignKey("ft_jobs.id"), nullable=False, index=True),
    Column("level", String(8), nullable=False),
    Column("type", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

ft_checkpoints = Table(
    "ft_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", String(40), ForeignKey("ft_jobs.id"), nullable=False, index=True),
    Column("step", Integer, nullable=False),
    Column("metrics", JSON, nullable=False),
    # ft:BASE:TENANT:SUFFIX:ID:ckpt-step-N, served as the registry version ``ref``.
    Column("name", String(255), nullable=False, unique=True),
    Column("ref", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# -- fleet ---------------------------------------------------------------------------------------
# Pinned aliases: the gateways keep the version each one points at loaded on its replicas (see
# registry/fleet/). A pin names an alias, never a version, so it follows the alias when it moves.

adapter_pins = Table(
    "adapter_pins",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("adapter_id", Integer, ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
    Column("alias", String(32), nullable=False),
    # How many replicas keep it loaded; NULL: as many as the router gives the adapter.
    Column("replicas", Integer),
    Column("created_by", String(40), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("adapter_id", "alias", name="uq_adapter_pins_adapter_alias"),
)
