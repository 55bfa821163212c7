"""Where a run lives (a script's or an exploration's) and how the runner's reports reach the
database.

The blueprints and the app factory import these; they import no blueprint. Code that
needs a run's folder gets it from ``run_folder(app, run)``, a function of the run row
alone, whatever made the run.
"""
import contextlib
import os
import shutil

from custom_keras import registry, storage
from visualizer.models import ACTIVE_STATES, ENDED_STATES, Run, db, utc_from_timestamp


@contextlib.contextmanager
def folder_with_row():
    """All or nothing for a new row and the folder it owns: the block adds the row and calls
    the yielded ``fresh(folder)``, which makes the folder anew (the database is the truth: a
    folder without its row is a leftover) and returns it. At the end the session is
    committed; when anything in the block fails, it is rolled back, the folder made is
    removed, and the error goes on.
    """
    made = []

    def fresh(folder):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        made.append(folder)
        return folder

    try:
        yield fresh
        db.session.commit()
    except BaseException:
        db.session.rollback()
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def script_dir(app, script):
    """The script's folder ``<STORAGE_DIR>/<user_id>/<stem>``: its upload and its runs."""
    return storage.run_dir_in(app.config["STORAGE_DIR"], script.rel_dir)


def technique_tabs(app, run):
    """The techniques whose tabs a run's pages show: every one, except those shown only when
    the run registered one of their techniques (the attribution methods)."""
    try:
        registered = storage.read_techniques(run_folder(app, run)) if run else None
    except OSError:  # unreadable: the tabs that need none
        registered = None
    return [technique for technique in registry.TECHNIQUES if technique.shows_tab(registered)]


def script_path(app, script):
    """The script as uploaded, in its folder."""
    return os.path.join(script_dir(app, script), script.filename)


def run_rel_dir(run):
    """The run's folder relative to STORAGE_DIR, e.g. for a token: a script run's own folder
    (``storage.run_rel_dir``), or for an exploration's job the exploration's folder."""
    if run.exploration_id is not None:
        return run.exploration.rel_dir
    return storage.run_rel_dir(run.script.user_id, run.script.filename, run.id)


def run_folder(app, run):
    """THE folder of a run: ``<STORAGE_DIR>/<user_id>/<stem>/runs/<run_id>`` for a script's,
    ``<STORAGE_DIR>/<user_id>/explore@<id>`` for an exploration's."""
    return storage.run_dir_in(app.config["STORAGE_DIR"], run_rel_dir(run))


def run_script_path(app, run):
    """The program a run runs: the copy of the script in the run's folder, or the
    exploration's job script."""
    name = storage.EXPLORE_SCRIPT_FILE if run.exploration_id is not None else run.script.filename
    return os.path.join(run_folder(app, run), name)


def final_metrics(app, run):
    """{metric: value} of the run's last training and validation rows, or None.

    Stored in the row when the run ended; read from its folder while it runs (or
    when the row has none)."""
    if run.final_metrics is not None:
        return run.final_metrics
    try:
        return storage.read_final_metrics(run_folder(app, run))
    except (OSError, ValueError):  # a link, a pipe, a huge or malformed line
        return None


def alert_count(app, run):
    """How many alerts the run's health checks raised: stored when it ended, else read."""
    if run.alert_count is not None:
        return run.alert_count
    return len(storage.read_alerts(run_folder(app, run))[0])


def exploration_dir(app, exploration):
    """The folder of an exploration: ``<STORAGE_DIR>/<user_id>/explore@<id>``."""
    return storage.run_dir_in(app.config["STORAGE_DIR"], exploration.rel_dir)


def free_a_slot_for_training(app, new_run):
    """Stops the oldest running exploration job when the other runs take every local run
    slot, so ``new_run`` does not wait for explorations that may sit idle for minutes; a
    stopped job starts again at the exploration page's next request, its results kept."""
    if app.config["RUNNER_KIND"] != "local":
        return None  # Ray queues jobs by the cluster's resources
    active = Run.query.filter(Run.state.in_(ACTIVE_STATES), Run.id != new_run.id).all()
    running_jobs = [run for run in active if run.exploration_id is not None
                    and run.state == storage.RUN_RUNNING]
    if len(active) < app.config["MAX_CONCURRENT_RUNS"] or not running_jobs:
        return None
    oldest = min(running_jobs, key=lambda run: run.started_at or run.created_at)
    app.extensions["runner"].stop(oldest.id)
    return oldest


def apply_run_update(app, update):
    """Write a runner's state change (a ``RunUpdate``) into the database.

    When the run has ended, its final metrics and alert count are read from its folder
    into the row. Called from the runner's monitor thread, hence the app context of its own.
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
        if run.state in ENDED_STATES:
            record_results(app, run)
        db.session.commit()


def record_results(app, run):
    """Reads the ended run's final metrics and alert count from its folder into its row."""
    folder = run_folder(app, run)
    try:
        run.final_metrics = storage.read_final_metrics(folder)
    except (OSError, ValueError):
        run.final_metrics = None
    run.alert_count = len(storage.read_alerts(folder)[0])
