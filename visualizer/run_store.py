"""Where a script's run lives and how the runner's reports reach the database.

The blueprints and the app factory import these; they import no blueprint.
"""
import os

from custom_keras import registry, storage
from visualizer.models import Run, db, utc_from_timestamp


def run_dir(app, script):
    """The run folder of a script: ``<STORAGE_DIR>/<user_id>/<stem>``."""
    return storage.run_dir_in(app.config["STORAGE_DIR"], script.rel_dir)


def technique_tabs(app, script):
    """The techniques whose tabs a script's pages show: every one, except those shown only
    when the run registered one of their techniques (the attribution methods' comparison)."""
    try:
        registered = storage.read_techniques(run_dir(app, script))
    except OSError:  # unreadable: the tabs that need none
        registered = None
    return [technique for technique in registry.TECHNIQUES if technique.shows_tab(registered)]


def run_folder(app, run):
    """The folder of one run (``visualizer.models.Run``): where its results and output are."""
    return run_dir(app, run.script)


def script_path(app, script):
    return os.path.join(run_dir(app, script), script.filename)


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
