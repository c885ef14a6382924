"""measures version 2: each channel's percentile against random directions at the same cosine
to its neuron's w (from the random vectors' channels, now kept with the reference), and the
measures version of each neuron side (runs measured before stay
readable at version 1 until `channelscope measures RUN` backfills them)

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("references") as batch:
        batch.add_column(sa.Column("channel_vectors", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("channels") as batch:
        batch.add_column(sa.Column("percentile_local", sa.Float(), nullable=True))
    with op.batch_alter_table("neurons") as batch:
        batch.add_column(sa.Column("measures_version", sa.SmallInteger(), server_default="1", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("neurons") as batch:
        batch.drop_column("measures_version")
    with op.batch_alter_table("channels") as batch:
        batch.drop_column("percentile_local")
    with op.batch_alter_table("references") as batch:
        batch.drop_column("channel_vectors")
