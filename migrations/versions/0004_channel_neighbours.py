"""channel neighbours: each channel's nearest channels in its run, precomputed by the worker

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "neighbour_builds",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_neighbour_builds_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_neighbour_builds")),
    )
    op.create_table(
        "channel_neighbours",
        sa.Column("neuron_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.SmallInteger(), nullable=False),
        sa.Column("neighbours", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["neuron_id", "channel"],
            ["channels.neuron_id", "channels.channel"],
            name=op.f("fk_channel_neighbours_neuron_id_channels"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("neuron_id", "channel", name=op.f("pk_channel_neighbours")),
    )


def downgrade() -> None:
    op.drop_table("channel_neighbours")
    op.drop_table("neighbour_builds")
