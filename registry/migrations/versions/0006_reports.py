"""A version keeps its run's whole report (loss curves, samples, lineage) as a blob.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("report_sha256", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("report_sha256")
