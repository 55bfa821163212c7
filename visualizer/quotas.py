"""Per-user quotas: how many files a user keeps and how much storage all their runs take.

Storage is measured by walking the user's folder with lstat (``storage.disk_usage``),
never following a link, so a run cannot hide its files behind links or count
another user's. The user's folder holds every script and every kept run of each, so
all runs count. Checked before an upload and before a run writes anything; a run is
given the room that is left (``run_disk_limit_mb``), which the runner enforces.
"""

from flask import current_app

from custom_keras import storage
from visualizer.models import Exploration, Script


class QuotaExceeded(ValueError):
    """A user reached the number of files or the storage they may use; the message says which."""


def user_dir(app, user_id):
    """The folder of all of a user's run folders: ``<STORAGE_DIR>/<user_id>``."""
    return storage.user_dir(app.config["STORAGE_DIR"], user_id)


def storage_limit_bytes(app):
    return int(app.config["USER_STORAGE_MB"] * storage.MIB)


def check_upload(user_id, new_bytes):
    """Raises ``QuotaExceeded`` when the user may not add a file of ``new_bytes``.

    Args:
        user_id: the uploading user.
        new_bytes: size of the new script.
    """
    app = current_app
    count = Script.query.filter_by(user_id=user_id).count()
    if count >= app.config["USER_MAX_SCRIPTS"]:
        raise QuotaExceeded("You have %d files, the most one account may keep. Delete a file "
                            "before uploading another." % count)
    check_storage(user_id, new_bytes)


def check_storage(user_id, new_bytes):
    """Raises ``QuotaExceeded`` when ``new_bytes`` more would put the user over their storage."""
    app = current_app
    used, limit = storage.disk_usage(user_dir(app, user_id)), storage_limit_bytes(app)
    if used + new_bytes > limit:
        raise QuotaExceeded("Your storage is full: your files use %s of your %s. Delete files "
                            "or their results to make room." % (
                                storage.format_bytes(used), storage.format_bytes(limit)))


def check_new_run(user_id, new_bytes):
    """Raises ``QuotaExceeded`` when a new run's folder, ``new_bytes`` to begin with (the
    script's copy and the images), leaves no room for its results."""
    app = current_app
    used, limit = storage.disk_usage(user_dir(app, user_id)), storage_limit_bytes(app)
    if used + new_bytes >= limit:
        raise QuotaExceeded("Your storage is full: your files and their runs use %s of your %s, "
                            "and a run needs room for its results. Delete runs or files to make "
                            "room." % (storage.format_bytes(used), storage.format_bytes(limit)))


def run_disk_limit_mb(user_id, folder):
    """The storage, in MB, that a new run may fill in its ``folder``: the user's storage
    limit less what the user's other scripts and runs take."""
    app = current_app
    others = storage.disk_usage(user_dir(app, user_id)) - storage.disk_usage(folder)
    return (storage_limit_bytes(app) - others) / storage.MIB


def check_exploration_upload(user_id, new_bytes):
    """Raises ``QuotaExceeded`` when the user may not add an exploration of ``new_bytes``
    (its model and inputs). Explorations count apart from files, up to the same number;
    their folders count in the user's storage like run folders.
    """
    app = current_app
    count = Exploration.query.filter_by(user_id=user_id).count()
    if count >= app.config["USER_MAX_SCRIPTS"]:
        raise QuotaExceeded("You have %d explorations, the most one account may keep. Delete "
                            "one before starting another." % count)
    used, limit = storage.disk_usage(user_dir(app, user_id)), storage_limit_bytes(app)
    if used + new_bytes > limit:
        raise QuotaExceeded("Your storage is full: your files and explorations use %s of your "
                            "%s, and this exploration needs %s. Delete files or explorations "
                            "to make room." % (storage.format_bytes(used),
                                               storage.format_bytes(limit),
                                               storage.format_bytes(new_bytes)))


def exploration_disk_limit_mb(user_id, folder):
    """The storage, in MB, that an exploration's job may fill in its folder (as a run's).

    Raises:
        QuotaExceeded: nothing is left for the job's results.
    """
    allowed_mb = run_disk_limit_mb(user_id, folder)
    if storage.disk_usage(folder) >= allowed_mb * storage.MIB:
        raise QuotaExceeded("Your storage is full (%s); delete files or explorations to make "
                            "room for the analysis." % storage.format_bytes(
                                storage_limit_bytes(current_app)))
    return allowed_mb
