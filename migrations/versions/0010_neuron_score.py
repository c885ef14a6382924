"""measures version 3: each neuron side's calibrated score, its best channel's faithfulness
percentile against the same statistic of held-out random vectors (50 = as good as random).
Null until `channelscope measures RUN` backfills runs measured before.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("neurons") as batch:
        batch.add_column(sa.Column("score", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("neurons") as batch:
        batch.drop_column("score")
