"""Fine-tuning: uploaded files, jobs (with their claim and lease), job events, checkpoints.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def _at(name: str = "created_at", nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "ft_files",
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("format", sa.String(64)),
        sa.Column("examples", sa.Integer),
        _at(),
    )
    op.create_table(
        "ft_jobs",
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
        sa.Column("status", sa.String(24), nullable=False, index=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("base", sa.Text, nullable=False),
        sa.Column("training_file", sa.String(40), nullable=False),
        sa.Column("validation_file", sa.String(40)),
        sa.Column("suffix", sa.String(64)),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("hyperparameters", sa.JSON, nullable=False),
        sa.Column("adapter_method", sa.JSON, nullable=False),
        sa.Column("evaluators", sa.JSON, nullable=False),
        sa.Column("user_metadata", sa.JSON),
        sa.Column("fine_tuned_model", sa.String(255), unique=True),
        sa.Column("result_ref", sa.String(200)),
        sa.Column("result_files", sa.JSON, nullable=False),
        sa.Column("trained_tokens", sa.BigInteger),
        sa.Column("error", sa.JSON),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("worker_id", sa.String(200)),
        _at("heartbeat_at", nullable=True),
        _at("lease_expires_at", nullable=True),
        sa.Column("publishing", sa.Integer, nullable=False, server_default="0"),
        _at(),
        _at("started_at", nullable=True),
        _at("finished_at", nullable=True),
        _at("estimated_finish", nullable=True),
    )
    op.create_table(
        "ft_job_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("ft_jobs.id"), nullable=False, index=True),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", sa.JSON),
        _at(),
    )
    op.create_table(
        "ft_checkpoints",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("ft_jobs.id"), nullable=False, index=True),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("ref", sa.String(200), nullable=False),
        _at(),
    )


def downgrade() -> None:
    for table in ("ft_checkpoints", "ft_job_events", "ft_jobs", "ft_files"):
        op.drop_table(table)
