"""Alembic's environment for the visualizer: the app's engine and models (Flask-Migrate).

Runs inside the app's context (create_app or the ``flask db`` commands).
"""
from alembic import context
from flask import current_app

migrate_config = current_app.extensions["migrate"]


def run_migrations_online():
    with migrate_config.db.engine.connect() as connection:
        context.configure(connection=connection, target_metadata=migrate_config.db.metadata,
                          **migrate_config.configure_args)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
