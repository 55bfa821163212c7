"""Where a run lives (a script's or an exploration's) and how the runner's reports reach the
database.

The blueprints and the app factory import these; they import no blueprint.
"""
import os

from custom_keras import storage
from visualizer.models import Run, db, utc_from_timestamp


def run_dir(app, script):
    """The run folder of a script: ``<STORAGE_DIR>/<user_id>/<stem>``."""
    return storage.run_dir_in(app.config["STORAGE_DIR"], script.rel_dir)


def script_path(app, script):
    return os.path.join(run_dir(app, script), script.filename)


def exploration_dir(app, exploration):
    """The folder of an exploration: ``<STORAGE_DIR>/<user_id>/explore@<id>``."""
    return storage.run_dir_in(app.config["STORAGE_DIR"], exploration.rel_dir)


def run_folder(app, run):
    """The folder a run works in: its exploration's, or its script's run folder."""
    if run.exploration_id is not None:
        return exploration_dir(app, run.exploration)
    return run_dir(app, run.script)


def run_script_path(app, run):
    """The program a run runs: the exploration's job script, or the script."""
    if run.exploration_id is not None:
        return os.path.join(run_folder(app, run), storage.EXPLORE_SCRIPT_FILE)
    return script_path(app, run.script)


def apply_run_update(app, update):
    """Write a runner's state change (a ``RunUpdate``) into the database.

    Called from the runner's monitor thread, hence the app context of its own.
    """
    with app.app_context():
        run = db.session.get(Run, update.run_id)
        if run is None:
            return
        run.state = update.state
        run.exit_code = update.exit_code
        run.pid = update.pid
        run.message = update.message
        if update.started_at is not None:
            run.started_at = utc_from_timestamp(update.started_at)
        if update.ended_at is not None:
            run.ended_at = utc_from_timestamp(update.ended_at)
        db.session.commit()
