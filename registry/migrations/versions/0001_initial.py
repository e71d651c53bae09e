"""Tenants, bases, adapters, versions and their files, aliases and their history.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def _at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(40), nullable=False, unique=True),
        _at(),
    )
    op.create_table(
        "bases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(80), nullable=False, unique=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("chat_template_sha256", sa.String(64)),
        _at(),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("last_version", sa.Integer, nullable=False, server_default="0"),
        _at(),
        sa.UniqueConstraint("tenant_id", "name", name="uq_adapters_tenant_name"),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("base_id", sa.Integer, sa.ForeignKey("bases.id"), nullable=False),
        sa.Column("peft_type", sa.String(40), nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("served_by", sa.JSON, nullable=False),
        sa.Column("rank", sa.Integer),
        sa.Column("dataset_sha256", sa.String(64)),
        sa.Column("data_format", sa.String(64)),
        sa.Column("metrics", sa.JSON),
        sa.Column("chat_template_sha256", sa.String(64)),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("library_versions", sa.JSON),
        sa.Column("source", sa.String(16), nullable=False),
        _at(),
        sa.UniqueConstraint("adapter_id", "version", name="uq_versions_adapter_version"),
    )
    op.create_table(
        "version_files",
        sa.Column(
            "version_id", sa.Integer, sa.ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("path", sa.String(255), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_version_files_sha256", "version_files", ["sha256"])
    op.create_table(
        "aliases",
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id"), primary_key=True),
        sa.Column("alias", sa.String(32), primary_key=True),
        sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "alias_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id"), nullable=False),
        sa.Column("alias", sa.String(32), nullable=False),
        sa.Column("old_version", sa.Integer),
        sa.Column("new_version", sa.Integer),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_alias_events_adapter_id", "alias_events", ["adapter_id"])


def downgrade() -> None:
    for table in ("alias_events", "aliases", "version_files", "versions", "adapters", "bases", "tenants"):
        op.drop_table(table)
