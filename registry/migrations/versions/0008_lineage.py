"""Lineage: a version names the version it was tuned from (``parent``, a ``tenant/name@N`` ref;
null: tuned from the base), and a fine-tuning job the fine-tuned model it continues
(``parent``: the model name asked for and the version it meant; null: the base).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("parent", sa.String(300)))
    with op.batch_alter_table("ft_jobs") as batch:
        batch.add_column(sa.Column("parent", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("ft_jobs") as batch:
        batch.drop_column("parent")
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("parent")
