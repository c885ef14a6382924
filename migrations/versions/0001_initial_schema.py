"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 22:44:32.462600
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("n_layers", sa.Integer(), nullable=False),
        sa.Column("d_model", sa.Integer(), nullable=False),
        sa.Column("d_mlp", sa.Integer(), nullable=False),
        sa.Column("vocab_size", sa.Integer(), nullable=False),
        sa.Column("sides", sa.String(length=20), nullable=False),
        sa.Column("vocabulary", sa.LargeBinary(), nullable=False),
        sa.Column("unembedding", sa.LargeBinary(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")),
    )
    op.create_table(
        "references",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=32), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("faithfulness", sa.LargeBinary(), nullable=False),
        sa.Column("kurtosis", sa.LargeBinary(), nullable=False),
        sa.Column("generic", sa.LargeBinary(), nullable=False),
        sa.Column("tail_tokens", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_references_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_references")),
        sa.UniqueConstraint("key", name=op.f("uq_references_key")),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(length=16), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("reference_id", sa.Integer(), nullable=True),
        sa.Column("solver", sa.String(length=10), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("projection", sa.String(length=20), nullable=False),
        sa.Column("algorithm_version", sa.Integer(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_runs_model_id_models"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["reference_id"], ["references.id"], name=op.f("fk_runs_reference_id_references")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint("hash", name=op.f("uq_runs_hash")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_runs_model_id"), ["model_id"], unique=False)

    op.create_table(
        "shards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("side", sa.String(length=4), nullable=False),
        sa.Column("neuron_start", sa.Integer(), nullable=False),
        sa.Column("neuron_stop", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("side IN ('gate', 'in', 'out')", name=op.f("ck_shards_side")),
        sa.CheckConstraint("neuron_stop > neuron_start", name=op.f("ck_shards_neurons")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_shards_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shards")),
        sa.UniqueConstraint(
            "run_id", "layer", "side", "neuron_start", name=op.f("uq_shards_run_id_layer_side_neuron_start")
        ),
    )
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_shards_run_id"), ["run_id"], unique=False)

    op.create_table(
        "neurons",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("shard_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("side", sa.String(length=4), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("norm", sa.Float(), nullable=False),
        sa.Column("kurtosis", sa.Float(), nullable=False),
        sa.Column("skew", sa.Float(), nullable=False),
        sa.Column("top_tokens", sa.JSON(), nullable=False),
        sa.Column("bottom_tokens", sa.JSON(), nullable=False),
        sa.Column("reconstruction", sa.JSON(), nullable=False),
        sa.Column("reconstruction_baseline", sa.JSON(), nullable=False),
        sa.Column("coverage", sa.JSON(), nullable=False),
        sa.Column("best_percentile", sa.Float(), nullable=False),
        sa.Column("best_kurtosis", sa.Float(), nullable=False),
        sa.Column("channel_count", sa.SmallInteger(), nullable=False),
        sa.Column("generic_count", sa.SmallInteger(), nullable=False),
        sa.CheckConstraint("side IN ('gate', 'in', 'out')", name=op.f("ck_neurons_side")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_neurons_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["shard_id"], ["shards.id"], name=op.f("fk_neurons_shard_id_shards"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_neurons")),
        sa.UniqueConstraint(
            "run_id", "layer", "side", "neuron", name=op.f("uq_neurons_run_id_layer_side_neuron")
        ),
    )
    with op.batch_alter_table("neurons", schema=None) as batch_op:
        batch_op.create_index(
            "ix_neurons_by_best_kurtosis",
            ["run_id", "layer", "side", "best_kurtosis", "neuron"],
            unique=False,
        )
        batch_op.create_index(
            "ix_neurons_by_kurtosis", ["run_id", "layer", "side", "kurtosis", "neuron"], unique=False
        )
        batch_op.create_index(
            "ix_neurons_by_percentile", ["run_id", "layer", "side", "best_percentile", "neuron"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_neurons_shard_id"), ["shard_id"], unique=False)

    op.create_table(
        "channels",
        sa.Column("neuron_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.SmallInteger(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("kurtosis", sa.Float(), nullable=False),
        sa.Column("skew", sa.Float(), nullable=False),
        sa.Column("cos", sa.Float(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("masked", sa.LargeBinary(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("history", sa.LargeBinary(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("faithfulness", sa.Float(), nullable=False),
        sa.Column("faithfulness_percentile", sa.Float(), nullable=False),
        sa.Column("generic", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["neuron_id"], ["neurons.id"], name=op.f("fk_channels_neuron_id_neurons"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("neuron_id", "channel", name=op.f("pk_channels")),
    )
    op.create_table(
        "channel_tokens",
        sa.Column("neuron_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.SmallInteger(), nullable=False),
        sa.Column("rank", sa.SmallInteger(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("z", sa.Float(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("side", sa.String(length=4), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("kurtosis", sa.Float(), nullable=False),
        sa.Column("faithfulness_percentile", sa.Float(), nullable=False),
        sa.Column("generic", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["neuron_id", "channel"],
            ["channels.neuron_id", "channels.channel"],
            name=op.f("fk_channel_tokens_neuron_id_channels"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("neuron_id", "channel", "rank", name=op.f("pk_channel_tokens")),
    )
    with op.batch_alter_table("channel_tokens", schema=None) as batch_op:
        batch_op.create_index(
            "ix_channel_tokens_by_percentile",
            ["run_id", "token_id", "faithfulness_percentile", "z", "neuron_id", "channel"],
            unique=False,
        )
        batch_op.create_index(
            "ix_channel_tokens_by_z", ["run_id", "token_id", "z", "neuron_id", "channel"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("channel_tokens", schema=None) as batch_op:
        batch_op.drop_index("ix_channel_tokens_by_z")
        batch_op.drop_index("ix_channel_tokens_by_percentile")

    op.drop_table("channel_tokens")
    op.drop_table("channels")
    with op.batch_alter_table("neurons", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_neurons_shard_id"))
        batch_op.drop_index("ix_neurons_by_percentile")
        batch_op.drop_index("ix_neurons_by_kurtosis")
        batch_op.drop_index("ix_neurons_by_best_kurtosis")

    op.drop_table("neurons")
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_shards_run_id"))

    op.drop_table("shards")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_model_id"))

    op.drop_table("runs")
    op.drop_table("references")
    op.drop_table("models")
