"""Explore: explorations of uploaded models, their analysis jobs as runs, filter marks.

A run now belongs to a script or to an exploration: ``run.script_id`` becomes nullable
and ``run.exploration_id`` is added. Existing runs keep their scripts.

Revision ID: 0004
Revises: 0002 (the lead re-chains it after 0003)
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "exploration",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=10), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("class_names", sa.Text()),
        sa.Column("notices", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["user.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_exploration_user_id", "exploration", ["user_id"])
    op.create_table(
        "filter_mark",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("filter_index", sa.Integer(), nullable=False),
        sa.Column("mark", sa.String(length=4), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["user.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "model_sha256", "node", "filter_index"),
    )
    op.create_index("ix_filter_mark_user_id", "filter_mark", ["user_id"])
    # SQLite changes a column by copying the table: batch mode does that.
    with op.batch_alter_table("run") as batch:
        batch.alter_column("script_id", existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column("exploration_id", sa.Integer()))
        batch.create_foreign_key("fk_run_exploration_id", "exploration", ["exploration_id"],
                                 ["id"])
        batch.create_index("ix_run_exploration_id", ["exploration_id"])


def downgrade():
    # The runs of explorations have no script: they go with the explorations.
    op.execute("DELETE FROM run WHERE script_id IS NULL")
    with op.batch_alter_table("run") as batch:
        batch.drop_index("ix_run_exploration_id")
        batch.drop_constraint("fk_run_exploration_id", type_="foreignkey")
        batch.drop_column("exploration_id")
        batch.alter_column("script_id", existing_type=sa.Integer(), nullable=False)
    op.drop_index("ix_filter_mark_user_id", table_name="filter_mark")
    op.drop_table("filter_mark")
    op.drop_index("ix_exploration_user_id", table_name="exploration")
    op.drop_table("exploration")
