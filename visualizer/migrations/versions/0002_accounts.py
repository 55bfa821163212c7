"""Accounts: login sessions kept server-side, login throttling, tags per user.

A tag that several users had (one global row) becomes one row per user, each
on that user's scripts; tags on no script are dropped, as the app drops them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "login_session",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["user.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_login_session_user_id", "login_session", ["user_id"])
    op.create_table(
        "login_throttle",
        sa.Column("scope", sa.String(length=10), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failure_at", sa.DateTime(), nullable=False),
        sa.Column("locked_until", sa.DateTime()),
        sa.PrimaryKeyConstraint("scope", "key"),
    )
    # Tags per user: new tables filled from the old ones, then put in their place.
    op.create_table(
        "tag_per_user",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["user.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "name"),
    )
    op.execute("INSERT INTO tag_per_user (user_id, name) "
               "SELECT DISTINCT script.user_id, tag.name FROM script_tags "
               "JOIN script ON script.id = script_tags.script_id "
               "JOIN tag ON tag.id = script_tags.tag_id")
    _create_script_tags("script_tags_per_user", "tag_per_user")
    op.execute("INSERT INTO script_tags_per_user (script_id, tag_id) "
               "SELECT script_tags.script_id, tag_per_user.id FROM script_tags "
               "JOIN script ON script.id = script_tags.script_id "
               "JOIN tag ON tag.id = script_tags.tag_id "
               "JOIN tag_per_user ON tag_per_user.user_id = script.user_id "
               "AND tag_per_user.name = tag.name")
    _replace_tag_tables("tag_per_user", "script_tags_per_user")
    op.create_index("ix_tag_user_id", "tag", ["user_id"])


def downgrade():
    op.drop_index("ix_tag_user_id", table_name="tag")
    op.create_table(
        "tag_global",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.execute("INSERT INTO tag_global (id, name) SELECT MIN(id), name FROM tag GROUP BY name")
    _create_script_tags("script_tags_global", "tag_global")
    op.execute("INSERT INTO script_tags_global (script_id, tag_id) "
               "SELECT DISTINCT script_tags.script_id, tag_global.id FROM script_tags "
               "JOIN tag ON tag.id = script_tags.tag_id "
               "JOIN tag_global ON tag_global.name = tag.name")
    _replace_tag_tables("tag_global", "script_tags_global")
    op.drop_table("login_throttle")
    op.drop_index("ix_login_session_user_id", table_name="login_session")
    op.drop_table("login_session")


def _create_script_tags(name, tag_table):
    op.create_table(
        name,
        sa.Column("script_id", sa.Integer(), nullable=False),
        sa.Column("tag_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["script_id"], ["script.id"]),
        sa.ForeignKeyConstraint(["tag_id"], ["%s.id" % tag_table]),
        sa.PrimaryKeyConstraint("script_id", "tag_id"),
    )


def _replace_tag_tables(tag_table, script_tags_table):
    """Drops tag and script_tags and gives their names to the new tables.

    Renaming the tag table also renames script_tags' reference to it (SQLite
    3.26 and later, PostgreSQL, MySQL).
    """
    op.drop_table("script_tags")
    op.drop_table("tag")
    op.rename_table(tag_table, "tag")
    op.rename_table(script_tags_table, "script_tags")
