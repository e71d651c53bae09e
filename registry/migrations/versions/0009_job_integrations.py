"""A fine-tuning job keeps the integrations it was created with (null: none, as every job before it).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    with op.batch_alter_table("ft_jobs") as batch:
        batch.add_column(sa.Column("integrations", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("ft_jobs") as batch:
        batch.drop_column("integrations")
