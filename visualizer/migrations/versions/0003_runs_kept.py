"""Runs kept: each run has its own folder and its record (number, script hash, images,
final metrics, alert count).

Before, a script's one run folder was ``<storage>/<user_id>/<stem>``, which held the
script, the last run's images, results, networks, output and status. That folder is
renamed, whole and in one step, to the folder of the script's last run,
``<storage>/<user_id>/<stem>/runs/<run_id>`` (``storage.run_rel_dir``), so nothing the
run wrote is picked apart or lost, whatever it was; the script folder made around it
gets a copy of the script as uploaded. Earlier runs had lost their results to the
last one: their rows stay, without a folder.

The moves can be repeated: an upgrade killed half-way finishes at the next start
(the folder is first renamed aside to ``<user_id>/.upgrading-<run_id>``; a script
stem never starts with a dot). The downgrade moves each script's newest run folder
back to ``<user_id>/<stem>`` and deletes the script's other runs' folders, which the
old layout cannot hold.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
import hashlib
import os
import shutil

import sqlalchemy as sa
from alembic import op
from flask import current_app

from custom_keras import storage

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADING_PREFIX = ".upgrading-"


def upgrade():
    with op.batch_alter_table("run") as batch:
        batch.add_column(sa.Column("number", sa.Integer()))
        batch.add_column(sa.Column("script_sha256", sa.String(length=64)))
        batch.add_column(sa.Column("images", sa.JSON()))
        batch.add_column(sa.Column("final_metrics", sa.JSON()))
        batch.add_column(sa.Column("alert_count", sa.Integer()))
    connection = op.get_bind()
    storage_dir = current_app.config["STORAGE_DIR"]
    run_table = sa.table("run", sa.column("id", sa.Integer), sa.column("number", sa.Integer),
                         sa.column("script_sha256", sa.String), sa.column("images", sa.JSON),
                         sa.column("final_metrics", sa.JSON),
                         sa.column("alert_count", sa.Integer))
    scripts = connection.execute(sa.text(
        "SELECT id, user_id, filename FROM script ORDER BY id")).fetchall()
    for script_id, user_id, filename in scripts:
        run_ids = [row[0] for row in connection.execute(sa.text(
            "SELECT id FROM run WHERE script_id = :script_id ORDER BY id"),
            {"script_id": script_id})]
        for number, run_id in enumerate(run_ids, start=1):
            connection.execute(run_table.update().where(run_table.c.id == run_id)
                               .values(number=number))
        if run_ids:
            values = _move_last_run(storage_dir, user_id, filename, run_ids[-1])
            if values:
                connection.execute(run_table.update().where(run_table.c.id == run_ids[-1])
                                   .values(**values))


def _move_last_run(storage_dir, user_id, filename, run_id):
    """Makes the old run folder of a script the folder of its last run; returns that run's
    new columns read from it, or None when the script had no folder to move."""
    script_dir = storage.run_dir_in(storage_dir, storage.script_rel_dir(user_id, filename))
    run_dir = storage.run_dir_in(storage_dir, storage.run_rel_dir(user_id, filename, run_id))
    aside = os.path.join(storage.user_dir(storage_dir, user_id), UPGRADING_PREFIX + str(run_id))
    if not os.path.lexists(aside) and not os.path.isdir(run_dir):
        if os.path.islink(script_dir):  # a run left a link where its folder was: not data
            os.unlink(script_dir)
        if not os.path.isdir(script_dir):
            return None
        os.rename(script_dir, aside)
    if os.path.lexists(aside):
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
        os.rename(aside, run_dir)
    try:  # the run's folder is hostile input: the script as uploaded, read safely
        source = storage.read_run_file(run_dir, filename, storage.MAX_SCRIPT_BYTES)
    except OSError:
        source = None
    if source is not None and not os.path.exists(os.path.join(script_dir, filename)):
        with open(os.path.join(script_dir, filename), "wb") as f:
            f.write(source)
    try:
        final_metrics = storage.read_final_metrics(run_dir)
    except (OSError, ValueError):
        final_metrics = None
    return {"script_sha256": hashlib.sha256(source).hexdigest() if source is not None else None,
            "images": storage.list_images(run_dir), "final_metrics": final_metrics,
            "alert_count": len(storage.read_alerts(run_dir)[0])}


def downgrade():
    connection = op.get_bind()
    storage_dir = current_app.config["STORAGE_DIR"]
    scripts = connection.execute(sa.text(
        "SELECT script.id, script.user_id, script.filename, MAX(run.id) FROM script "
        "LEFT JOIN run ON run.script_id = script.id GROUP BY script.id")).fetchall()
    for _, user_id, filename, last_run_id in scripts:
        script_dir = storage.run_dir_in(storage_dir, storage.script_rel_dir(user_id, filename))
        if last_run_id is None or not os.path.isdir(script_dir):
            continue
        run_dir = storage.run_dir_in(storage_dir,
                                     storage.run_rel_dir(user_id, filename, last_run_id))
        if os.path.isdir(run_dir) and not os.path.islink(run_dir):
            aside = os.path.join(storage.user_dir(storage_dir, user_id),
                                 UPGRADING_PREFIX + str(last_run_id))
            os.rename(run_dir, aside)
            shutil.rmtree(script_dir)
            os.rename(aside, script_dir)
    with op.batch_alter_table("run") as batch:
        for name in ("alert_count", "final_metrics", "images", "script_sha256", "number"):
            batch.drop_column(name)
