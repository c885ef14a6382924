"""the whole model's raw projections (overview_layers); shards of scattered neurons

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "overview_layers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("side", sa.String(length=4), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("glitch_quantile", sa.Float(), nullable=False),
        sa.Column("vectors", sa.LargeBinary(), nullable=False),
        sa.Column("stats", sa.LargeBinary(), nullable=False),
        sa.Column("top_ids", sa.LargeBinary(), nullable=False),
        sa.Column("top_z", sa.LargeBinary(), nullable=False),
        sa.Column("bottom_ids", sa.LargeBinary(), nullable=False),
        sa.Column("bottom_z", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("side IN ('gate', 'in', 'out')", name=op.f("ck_overview_layers_side")),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_overview_layers_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_overview_layers")),
        sa.UniqueConstraint("model_id", "layer", "side", name=op.f("uq_overview_layers_model_id_layer_side")),
    )
    with op.batch_alter_table("shards") as batch:
        batch.add_column(sa.Column("neurons", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("size", sa.Integer(), nullable=True))
    op.execute("UPDATE shards SET size = neuron_stop - neuron_start")
    with op.batch_alter_table("shards") as batch:
        batch.alter_column("size", existing_type=sa.Integer(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        batch.drop_column("size")
        batch.drop_column("neurons")
    op.drop_table("overview_layers")
