"""An experiment keeps its settings (guardrails, auto-promote, live evaluators; null:
none, as every experiment before it), and each recorded response the scores of the live
evaluators that judged it (null: not sampled).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("settings", sa.JSON))
    with op.batch_alter_table("experiment_responses") as batch:
        batch.add_column(sa.Column("evals", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("experiment_responses") as batch:
        batch.drop_column("evals")
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("settings")
