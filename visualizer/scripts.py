"""Scripts: the file list, upload, the Overview tab, tags, delete and the network download."""
import os
import re
import shutil

from flask import (Blueprint, Response, abort, current_app, flash, redirect, render_template,
                   request, url_for)
from flask_login import current_user
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer
from werkzeug.http import dump_options_header
from werkzeug.utils import secure_filename

from custom_keras import storage
from visualizer import quotas
from visualizer.models import ENDED_STATES, FAILED, Run, Script, Tag, db, script_tags, utcnow
from visualizer.run_store import (alert_count, final_metrics, folder_with_row, run_folder,
                                  script_dir, script_path)

bp = Blueprint("scripts", __name__)

MAX_TAG_LENGTH = 40
DOWNLOAD_BLOCK_BYTES = 256 * 1024
SORT_KEYS = {
    "name": lambda s: s.filename.lower(),
    "tags": lambda s: " ".join(t.name for t in s.tags).lower(),
    "uploaded": lambda s: s.uploaded_at,
    "last_run": lambda s: (s.last_run is not None, s.last_run.last_change if s.last_run else 0),
}


def owned_script(script_id):
    """The current user's script with this id; 404 for another user's or a missing one."""
    script = db.session.get(Script, script_id)
    if script is None or script.user_id != current_user.id:
        abort(404)
    return script


def owned_run(script, run_id):
    """The run of this (owned) script with this id; 404 for a run of any other script."""
    run = db.session.get(Run, run_id)
    if run is None or run.script_id != script.id:
        abort(404)
    return run


def chosen_run(script):
    """The run a tab shows: ``?run=<run_id>`` of this script (404 for another's), else the
    newest, or None before the first run."""
    run_id = request.args.get("run")
    if run_id is None:
        return script.last_run
    if not (run_id.isascii() and run_id.isdigit()):
        abort(404)
    return owned_run(script, int(run_id))


def mark_seen(script):
    """Record that the user looked at the script, which clears its banner.

    Writes only when a run ended since the last look, so pages that poll cost no writes.
    """
    run = script.last_run
    if run is not None and run.ended_at is not None and run.ended_at > script.seen_at:
        script.seen_at = utcnow()
        db.session.commit()


def unseen_ended_runs(user):
    """The last runs of the user's scripts that ended after the user last opened the script."""
    runs = []
    for script in Script.query.filter_by(user_id=user.id).all():
        run = script.last_run
        if (run is not None and run.state in ENDED_STATES and run.ended_at is not None
                and run.ended_at > script.seen_at):
            runs.append(run)
    return runs


def parse_tags(text):
    """Tags from text split on whitespace, in order, without duplicates.

    Raises:
        ValueError: a tag is longer than MAX_TAG_LENGTH; the message names it.
    """
    tags = []
    for name in text.split():
        if len(name) > MAX_TAG_LENGTH:
            raise ValueError("Tag %s... is longer than %d characters."
                             % (name[:MAX_TAG_LENGTH], MAX_TAG_LENGTH))
        if name not in tags:
            tags.append(name)
    return tags


def get_or_create_tags(user_id, names):
    """The user's tags of these names, new rows for those the user does not have yet.

    Tags are per user, so another user's tag of the same name is neither reused nor revealed.
    """
    existing = {t.name: t for t in Tag.query.filter(Tag.user_id == user_id,
                                                    Tag.name.in_(names))} if names else {}
    return [existing.get(name) or Tag(user_id=user_id, name=name) for name in names]


def delete_orphan_tags():
    for tag in Tag.query.filter(~Tag.id.in_(db.session.query(script_tags.c.tag_id))):
        db.session.delete(tag)


def check_script_upload(upload):
    """Check an uploaded training script before anything is written.

    Args:
        upload: the werkzeug ``FileStorage`` of the form's file field, or None.

    Returns:
        (file name, source text, warning or None).

    Raises:
        ValueError: with a message saying what is wrong with the file.
    """
    if upload is None or not upload.filename:
        raise ValueError("Choose a .py file to upload.")
    filename = secure_filename(upload.filename)
    stem, extension = os.path.splitext(filename)
    if extension != ".py" or not stem or not re.fullmatch(r"[A-Za-z0-9_.-]+", stem):
        raise ValueError("%s is not a Python script: the file name must end in .py and use "
                         "letters, digits, '_', '-' or '.' only." % upload.filename)
    data = upload.read()
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("%s is not a UTF-8 text file; only Python source can be uploaded."
                         % filename) from None
    if "\x00" in source:
        raise ValueError("%s holds binary data (NUL bytes); only Python source can be uploaded."
                         % filename)
    warning = None
    try:
        compile(source, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        warning = "%s was uploaded, but Python cannot parse it: %s. Fix it before running." % (
            filename, error)
    return filename, source, warning


@bp.route("/")
def index():
    query = request.args.get("q", "").strip()
    sort = request.args.get("sort", "uploaded")
    if sort not in SORT_KEYS:
        sort = "uploaded"
    descending = request.args.get("order", "desc" if sort == "uploaded" else "asc") == "desc"
    all_scripts = Script.query.filter_by(user_id=current_user.id).all()
    scripts = [s for s in all_scripts if _matches(s, query.lower())]
    scripts.sort(key=SORT_KEYS[sort], reverse=descending)
    alert_counts = {s.id: alert_count(current_app, s.last_run) if s.last_run else 0
                    for s in scripts}
    return render_template("scripts/index.html", scripts=scripts, has_scripts=bool(all_scripts),
                           query=query, sort=sort, descending=descending,
                           alert_counts=alert_counts)


def _matches(script, query):
    return (not query or query in script.filename.lower()
            or any(query in tag.name.lower() for tag in script.tags))


@bp.route("/upload", methods=("GET", "POST"))
def upload():
    tags_text = ""
    if request.method == "POST":
        tags_text = request.form.get("tags", "")
        try:
            filename, source, warning = check_script_upload(request.files.get("file"))
            stem = os.path.splitext(filename)[0]
            tag_names = parse_tags(tags_text)
            stem_tag = stem[:MAX_TAG_LENGTH]
            if stem_tag not in tag_names:
                tag_names.append(stem_tag)
            if Script.query.filter_by(user_id=current_user.id, filename=filename).first():
                raise ValueError("You already have a file named %s; file names must be unique. "
                                 "Rename the file or delete the old one." % filename)
            quotas.check_upload(current_user.id, len(source.encode("utf-8")))
        except ValueError as error:
            flash(str(error), "error")
            return render_template("scripts/upload.html", tags=tags_text), 400
        script = Script(user_id=current_user.id, filename=filename,
                        tags=get_or_create_tags(current_user.id, tag_names))
        try:
            save_script(script, source)
        except OSError as error:
            flash("Could not save the upload: %s. Nothing was saved; the storage folder of the "
                  "server needs attention (free space, permissions)." % storage_error_text(error),
                  "error")
            return render_template("scripts/upload.html", tags=tags_text), 500
        flash("%s was uploaded." % filename, "success")
        if warning:
            flash(warning, "warning")
        return redirect(url_for("scripts.overview", script_id=script.id))
    return render_template("scripts/upload.html", tags=tags_text)


def save_script(script, source):
    """Writes the script into a fresh folder of its own, then adds its row to the database.

    All or nothing: when writing fails, the half-written folder is removed and
    the row is not added.

    Raises:
        OSError: the storage folder could not be written (full disk, read-only,
            a file where a folder should be); nothing is left behind.
    """
    with folder_with_row() as fresh:
        fresh(script_dir(current_app, script))
        with open(script_path(current_app, script), "w", encoding="utf-8", newline="") as f:
            f.write(source)
        db.session.add(script)


def storage_error_text(error):
    """What went wrong with the storage folder, e.g. "No space left on device".

    The reason only: the server's paths are not shown to users.
    """
    return error.strerror or type(error).__name__


@bp.route("/scripts/<int:script_id>")
def overview(script_id):
    script = owned_script(script_id)
    run = chosen_run(script)
    mark_seen(script)
    folder = run and run_folder(current_app, run)
    # the script as the chosen run ran it, else as uploaded
    code = highlight(read_script_source(folder or script_dir(current_app, script),
                                        script.filename),
                     PythonLexer(), HtmlFormatter(linenos="table"))
    # a failed run: the exception and where its traceback starts in the output
    failure = storage.read_failure(folder) if run and run.state == FAILED else None
    alerts, alerts_problem = storage.read_alerts(folder) if folder else ([], "")
    previous_run = script.last_run
    return render_template("scripts/overview.html", script=script, run=run, code=code,
                           has_network=bool(folder) and storage.is_run_file(
                               folder, _network_path(script)),
                           images=previous_image_names(previous_run), previous_run=previous_run,
                           failure=failure, summary=run_summary(current_app, run) if run else None,
                           alerts=alerts, alerts_problem=alerts_problem,
                           run_list=run_list(script),
                           folder_missing=bool(folder) and not os.path.isdir(folder))


def read_script_source(folder, filename):
    """The script's text from ``folder`` (a run's folder is hostile input), or a comment
    saying why it is not shown."""
    try:
        return storage.read_run_file(folder, filename,
                                     storage.MAX_SCRIPT_BYTES).decode("utf-8", "replace")
    except FileNotFoundError:
        return "# The script file is missing from the storage folder."
    except storage.UnsafeFileError as error:
        return "# The script file is not shown: %s." % error
    except OSError as error:
        return "# The script file cannot be read from the storage folder: %s." % (
            storage_error_text(error))


def previous_image_names(run):
    """The images of the newest run, which the Run dialog offers to keep."""
    return storage.list_images(run_folder(current_app, run)) if run else []


def run_list(script):
    """The script's runs, newest first, each as {"run", "metrics", "alerts", "hash_changed"};
    ``hash_changed`` says its script differs from the run before it."""
    rows, previous_hash = [], None
    for run in script.runs:  # oldest first
        rows.append({"run": run, "metrics": final_metrics(current_app, run),
                     "alerts": alert_count(current_app, run),
                     "hash_changed": previous_hash is not None and run.script_sha256 is not None
                     and run.script_sha256 != previous_hash})
        previous_hash = run.script_sha256 or previous_hash
    return rows[::-1]


def run_summary(app, run):
    """What the Overview says about a run's results.

    Returns:
        {"final": {metric: value} of the last training and validation rows or None,
        "best_epoch": (epoch, val_loss) of the lowest validation loss or None,
        "problem": why a table could not be read, or ""}.
    """
    folder = run_folder(app, run)
    summary = {"final": final_metrics(app, run), "best_epoch": None, "problem": ""}
    try:
        columns, rows, _ = storage.read_table(
            folder, storage.results_path(folder, storage.TRAINING_PROGRESS_VAL_TABLE))
        if columns and "epoch" in columns and "val_loss" in columns:
            epoch, loss = columns.index("epoch"), columns.index("val_loss")
            finite = [row for row in rows if len(row) == len(columns) and row[loss] == row[loss]]
            if finite:
                best = min(finite, key=lambda row: row[loss])
                summary["best_epoch"] = (int(best[epoch]), best[loss])
    except (OSError, ValueError) as error:  # a link, a pipe, a huge or malformed line
        summary["problem"] = "The training tables could not be read: %s." % error
    return summary


@bp.route("/scripts/<int:script_id>/source", methods=("POST",))
def replace_source(script_id):
    """Replaces the script with a new version; the runs keep the copies they ran, and the
    next run runs the new one (its hash in the run list shows the change)."""
    script = owned_script(script_id)
    overview = url_for("scripts.overview", script_id=script.id)
    try:
        _, source, warning = check_script_upload(request.files.get("file"))
        data = source.encode("utf-8")
        quotas.check_storage(current_user.id, len(data))
        storage.atomic_write_bytes(script_path(current_app, script), data)
    except ValueError as error:
        flash(str(error), "error")
        return redirect(overview)
    except OSError as error:
        flash("Could not save the new version: %s. The script is as it was; the storage folder "
              "of the server needs attention (free space, permissions)."
              % storage_error_text(error), "error")
        return redirect(overview)
    flash("%s was replaced by the new version; its next run runs it." % script.filename,
          "success")
    if warning:
        flash(warning, "warning")
    return redirect(overview)


@bp.route("/scripts/<int:script_id>/tags", methods=("POST",))
def add_tags(script_id):
    script = owned_script(script_id)
    try:
        names = parse_tags(request.form.get("tags", ""))
        if not names:
            raise ValueError("Type one or more tags, separated by spaces.")
    except ValueError as error:
        flash(str(error), "error")
        return redirect(url_for("scripts.overview", script_id=script.id))
    current = {t.name for t in script.tags}
    script.tags.extend(get_or_create_tags(current_user.id, [n for n in names if n not in current]))
    db.session.commit()
    return redirect(url_for("scripts.overview", script_id=script.id))


@bp.route("/scripts/<int:script_id>/tags/<int:tag_id>/remove", methods=("POST",))
def remove_tag(script_id, tag_id):
    script = owned_script(script_id)
    tag = next((t for t in script.tags if t.id == tag_id), None)
    if tag is None:
        abort(404)
    script.tags.remove(tag)
    delete_orphan_tags()
    db.session.commit()
    return redirect(url_for("scripts.overview", script_id=script.id))


@bp.route("/scripts/<int:script_id>/delete", methods=("POST",))
def delete(script_id):
    script = owned_script(script_id)
    if script.is_active:
        flash("%s is %s; stop it before deleting it." % (script.filename, script.last_run.state),
              "error")
        return redirect(url_for("scripts.overview", script_id=script.id))
    folder = script_dir(current_app, script)  # holds every run's folder too
    filename = script.filename
    db.session.delete(script)
    delete_orphan_tags()
    db.session.commit()
    shutil.rmtree(folder, ignore_errors=True)
    flash("%s and all its data were deleted." % filename, "success")
    return redirect(url_for("scripts.index"))


@bp.route("/scripts/<int:script_id>/network")
def download_network(script_id):
    """The network that the chosen run saved last (NetworkSaver replaces it every epoch)."""
    script = owned_script(script_id)
    run = chosen_run(script)
    back = url_for("scripts.overview", script_id=script.id, run=request.args.get("run"))
    try:
        if run is None:
            raise FileNotFoundError
        network = storage.open_run_file(run_folder(current_app, run), _network_path(script),
                                        storage.MAX_DOWNLOAD_BYTES)
    except FileNotFoundError:
        flash("%s has no saved network yet: run it with callbacks.register_network_saver()."
              % script.filename, "error")
        return redirect(back)
    except storage.UnsafeFileError as error:
        flash("The network of %s cannot be downloaded: %s." % (script.filename, error), "error")
        return redirect(back)
    return send_run_file(network, script.stem + ".keras", "application/octet-stream")


def _network_path(script):
    """The saved network inside the run folder (NetworkSaver's file name)."""
    return storage.network_file(script.stem)


def send_run_file(run_file, download_name, mimetype):
    """A download of an opened ``storage.RunFile``: its bytes as they were when it was opened.

    Streamed in blocks from the open descriptor (never by path again, which a run
    could have replaced with a link meanwhile); the descriptor is closed when the
    response is.

    Args:
        run_file: from ``storage.open_run_file``.
        download_name: the file name the browser saves; a sanitised name.
        mimetype: the content type.
    """
    def blocks():
        offset = 0
        while offset < run_file.size:
            block = run_file.read_at(offset, DOWNLOAD_BLOCK_BYTES)
            if not block:
                break
            offset += len(block)
            yield block

    response = Response(blocks(), mimetype=mimetype, headers={
        "Content-Length": str(run_file.size),
        "Content-Disposition": dump_options_header("attachment", {"filename": download_name})})
    response.call_on_close(run_file.close)
    return response
