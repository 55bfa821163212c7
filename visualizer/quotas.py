"""Per-user quotas: how many files a user keeps and how much storage all their run folders take.

Storage is measured by walking the user's folder with lstat (``storage.disk_usage``),
never following a link, so a run cannot hide its files behind links or count
another user's. Checked before an upload and before a run writes anything; a run
is given the room that is left (``run_disk_limit_mb``), which the runner enforces.
"""
import os

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
    used, limit = storage.disk_usage(user_dir(app, user_id)), storage_limit_bytes(app)
    if used + new_bytes > limit:
        raise QuotaExceeded("Your storage is full: your files use %s of your %s. Delete files "
                            "or their results to make room." % (
                                storage.format_bytes(used), storage.format_bytes(limit)))


def run_disk_limit_mb(script, folder, replaced_names, new_bytes):
    """The storage, in MB, that a new run of ``script`` may fill in its run folder.

    The run folder may grow to the user's storage limit less what the user's
    other run folders take; the previous run's files (``replaced_names``) are
    counted as gone and the new images (``new_bytes``) as written.

    Args:
        script: the script to run.
        folder: its run folder.
        replaced_names: entries of the run folder that preparing the run deletes.
        new_bytes: bytes of the new visualization images.

    Raises:
        QuotaExceeded: the run folder would be over that limit before the run starts.
    """
    app = current_app
    limit = storage_limit_bytes(app)
    folder_bytes = storage.disk_usage(folder)
    others = storage.disk_usage(user_dir(app, script.user_id)) - folder_bytes
    replaced = sum(storage.disk_usage(os.path.join(folder, name)) for name in replaced_names)
    allowed = limit - others
    if folder_bytes - replaced + new_bytes >= allowed:
        raise QuotaExceeded("Your storage is full: your files use %s of your %s, and a run needs "
                            "room for its results. Delete files or their results to make room."
                            % (storage.format_bytes(others + folder_bytes),
                               storage.format_bytes(limit)))
    return allowed / storage.MIB


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
    """The storage, in MB, that an exploration's job may fill in its folder: the user's
    storage limit less what the user's other folders take.

    Raises:
        QuotaExceeded: nothing is left for the job's results.
    """
    app = current_app
    limit = storage_limit_bytes(app)
    folder_bytes = storage.disk_usage(folder)
    allowed = limit - (storage.disk_usage(user_dir(app, user_id)) - folder_bytes)
    if folder_bytes >= allowed:
        raise QuotaExceeded("Your storage is full (%s); delete files or explorations to make "
                            "room for the analysis." % storage.format_bytes(limit))
    return allowed / storage.MIB
