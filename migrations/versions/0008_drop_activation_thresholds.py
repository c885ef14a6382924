"""drop activation_thresholds: the activation pass over the real corpus (activation_layers)
stores every neuron's threshold, and the committed corpus's separate pass is gone

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table("activation_thresholds")


def downgrade() -> None:
    op.create_table(
        "activation_thresholds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("corpus", sa.String(length=16), nullable=False),
        sa.Column("quantile", sa.Float(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("thresholds", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_activation_thresholds_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_activation_thresholds")),
        sa.UniqueConstraint(
            "model_id",
            "corpus",
            "quantile",
            "layer",
            name=op.f("uq_activation_thresholds_model_id_corpus_quantile_layer"),
        ),
    )
