"""A fine-tuning job names its training objective (null: supervised, as every job before it).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    with op.batch_alter_table("ft_jobs") as batch:
        batch.add_column(sa.Column("objective", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("ft_jobs") as batch:
        batch.drop_column("objective")
