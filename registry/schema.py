"""The registry's tables (SQLAlchemy Core). Changes go through a migration in ``migrations/``."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
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
