"""An experiment keeps what retention folded up of the responses it deleted (null: none deleted;
see registry/experiments/retention.py).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("pruned", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("pruned")
