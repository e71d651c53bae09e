"""Pinned aliases: the version an alias points at stays loaded on the serving replicas.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "adapter_pins",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("alias", sa.String(32), nullable=False),
        sa.Column("replicas", sa.Integer),
        sa.Column("created_by", sa.String(40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("adapter_id", "alias", name="uq_adapter_pins_adapter_alias"),
    )


def downgrade() -> None:
    op.drop_table("adapter_pins")
