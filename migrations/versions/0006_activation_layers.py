"""activation_layers: what each neuron does on the real corpus (top contexts, densities, thresholds)

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "activation_layers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("corpus", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("documents", sa.Integer(), nullable=False),
        sa.Column("ranges", sa.LargeBinary(), nullable=False),
        sa.Column("counts", sa.LargeBinary(), nullable=False),
        sa.Column("thresholds", sa.LargeBinary(), nullable=False),
        sa.Column("top_value", sa.LargeBinary(), nullable=False),
        sa.Column("top_doc", sa.LargeBinary(), nullable=False),
        sa.Column("top_pos", sa.LargeBinary(), nullable=False),
        sa.Column("window_tokens", sa.LargeBinary(), nullable=False),
        sa.Column("window_values", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_activation_layers_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_activation_layers")),
        sa.UniqueConstraint(
            "model_id", "corpus", "layer", name=op.f("uq_activation_layers_model_id_corpus_layer")
        ),
    )


def downgrade() -> None:
    op.drop_table("activation_layers")
