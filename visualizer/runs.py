"""Runs: run and stop a script, its live output, its images and the technique tabs."""
import io
import mimetypes
import os
import re
import shutil
import tempfile
import warnings

from flask import (Blueprint, abort, current_app, flash, jsonify, redirect, render_template,
                   request, send_file, url_for)
from PIL import Image
from werkzeug.http import dump_options_header
from werkzeug.utils import secure_filename

from custom_bokeh.auth import embed_script
from custom_keras import registry, storage
from visualizer import quotas
from visualizer.models import Run, db
from visualizer.run_store import run_dir, script_path
from visualizer.scripts import mark_seen, owned_script, send_run_file, storage_error_text

bp = Blueprint("runs", __name__, url_prefix="/scripts/<int:script_id>")

OUTPUT_LINES = 50
OUTPUT_WINDOW_LINES = 200  # lines the Output tab shows from a line on (a traceback)
TAIL_BLOCK_BYTES = 8 * 1024
CLEAN_LINE_BYTES = 1024 * 1024  # the cleaned download cleans a longer line in pieces


def check_images(uploads):
    """Verify uploaded visualization images with Pillow before anything is written.

    Args:
        uploads: werkzeug ``FileStorage`` objects (empty ones are skipped).

    Returns:
        list of (safe file name, bytes).

    Raises:
        ValueError: naming the file that is not a readable image, has a file
            name that is not an image name, or is a decompression bomb.
    """
    images = []
    for upload in uploads:
        if not upload or not upload.filename:
            continue
        name = secure_filename(upload.filename)
        if not name.lower().endswith(storage.IMAGE_EXTENSIONS):
            raise ValueError("%s is not an image file name; use one of %s."
                             % (upload.filename, ", ".join(storage.IMAGE_EXTENSIONS)))
        data = upload.read()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    image.verify()
                # verify() leaves the image unusable: open again and decode every pixel.
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ValueError("%s has too many pixels (more than %d); use a smaller image."
                             % (name, Image.MAX_IMAGE_PIXELS)) from None
        except Exception as error:  # Pillow raises many types for broken files
            raise ValueError("%s is not a readable image (%s)." % (name, error)) from None
        if name in (n for n, _ in images):
            raise ValueError("Two images are named %s; give them different names." % name)
        images.append((name, data))
    return images


# Folders inside a run folder that exist only while a new run's inputs are put in place:
# the new images being written, and the previous run's files on their way out.
STAGING_PREFIX = ".new-images-"
TRASH_PREFIX = ".previous-run-"


def clear_previous_results(folder, new_images):
    """Replace what an earlier run left (results, networks, output, status, images).

    All or nothing: the new images are first written into a staging folder inside
    the run folder; only once they are complete are the previous run's files moved
    aside (``os.replace``, which needs no space) and the new images renamed into
    place. If anything fails, everything moved is moved back, so the previous
    run's data are kept; the moved-aside files are deleted only at the end.

    Args:
        folder: the run folder.
        new_images: list of (name, bytes) that replace the images, or None to keep them.

    Raises:
        OSError: the run folder could not be written (full disk, read-only, a file
            where a folder should be); the folder is then as it was.
    """
    _remove_leftovers(folder)
    staging = None
    if new_images is not None:
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder)
        try:
            # Written in order, so the last one is the newest (see storage.list_images).
            for index, (name, data) in enumerate(new_images):
                path = os.path.join(staging, name)
                with open(path, "wb") as f:
                    f.write(data)
                os.utime(path, ns=(index, index))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    old_names = replaced_by_run(staging is not None)
    moved = []
    try:
        trash = tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=folder)
        try:
            for name in old_names:
                try:
                    os.replace(os.path.join(folder, name), os.path.join(trash, name))
                except FileNotFoundError:
                    continue
                moved.append(name)
            if staging:
                os.replace(staging, storage.images_dir(folder))
        except BaseException:
            for name in reversed(moved):  # put the previous run's files back
                os.replace(os.path.join(trash, name), os.path.join(folder, name))
            os.rmdir(trash)
            raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when it was put in place
    shutil.rmtree(trash, ignore_errors=True)


def replaced_by_run(new_images):
    """The entries of a run folder that a new run replaces (the images only when new ones come)."""
    return [storage.RESULTS_DIR, storage.NETWORKS_DIR, storage.OUTPUT_FILE,
            storage.STATUS_FILE] + ([storage.IMAGES_DIR] if new_images else [])


def _remove_leftovers(folder):
    """Deletes staging and moved-aside folders that a killed server left in the run folder."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        if name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


@bp.route("/run", methods=("POST",))
def run(script_id):
    script = owned_script(script_id)
    overview = url_for("scripts.overview", script_id=script.id)
    if script.is_active:
        flash("%s is already %s." % (script.filename, script.last_run.state), "error")
        return redirect(overview)
    folder = run_dir(current_app, script)
    choice = request.form.get("images", "new")
    try:
        if os.path.islink(folder) or os.path.islink(os.path.dirname(folder)):
            # preparing a run moves and deletes files: never in a folder a link points to
            raise ValueError("The run folder of %s was replaced by a link; delete the file and "
                             "upload it again." % script.filename)
        if choice not in ("new", "keep", "none"):
            raise ValueError("Choose new image(s), the previous image(s) or no image.")
        new_images = check_images(request.files.getlist("image")) if choice == "new" else []
        if choice == "new" and not new_images:
            raise ValueError("Choose a visualization image to upload, or keep the previous one.")
        if choice == "keep" and not storage.list_images(folder):
            raise ValueError("There is no previous image to keep; upload one.")
        disk_limit_mb = quotas.run_disk_limit_mb(
            script, folder, replaced_by_run(choice != "keep"), sum(len(d) for _, d in new_images))
    except ValueError as error:
        flash(str(error), "error")
        return redirect(overview)
    try:
        clear_previous_results(folder, None if choice == "keep" else new_images)
    except OSError as error:
        flash("Could not prepare the run: %s. Nothing was changed; the previous results and "
              "images are kept. The storage folder of the server needs attention (free space, "
              "permissions)." % storage_error_text(error), "error")
        return redirect(overview)
    run = Run(script=script, state=storage.RUN_QUEUED)
    db.session.add(run)
    db.session.commit()
    try:
        current_app.extensions["runner"].start(run.id, folder, script_path(current_app, script),
                                               disk_limit_mb=disk_limit_mb)
    except Exception as error:
        run.state, run.message = storage.RUN_FAILED, "could not start: %s" % error
        db.session.commit()
        flash("%s could not be started: %s" % (script.filename, error), "error")
        return redirect(overview)
    flash("%s was queued to run." % script.filename, "success")
    return redirect(overview)


@bp.route("/stop", methods=("POST",))
def stop(script_id):
    script = owned_script(script_id)
    if not script.is_active:
        flash("%s is not running." % script.filename, "error")
    else:
        current_app.extensions["runner"].stop(script.last_run.id)
        flash("Stopping %s." % script.filename, "success")
    return redirect(url_for("scripts.overview", script_id=script.id))


@bp.route("/output")
def output(script_id):
    """The live end of the output, or with ``?from=N`` the lines from line N on (not live)."""
    script = owned_script(script_id)
    mark_seen(script)
    folder = run_dir(current_app, script)
    first_line = request.args.get("from", type=int)
    if first_line is not None and first_line >= 1:
        lines = lines_from(folder, first_line)
    else:
        first_line, lines = None, tail_lines(folder)
    return render_template("scripts/output.html", script=script, lines=lines,
                           first_line=first_line, window=OUTPUT_WINDOW_LINES,
                           has_output=storage.is_run_file(folder, storage.OUTPUT_FILE))


@bp.route("/output.json")
def output_json(script_id):
    script = owned_script(script_id)
    return jsonify(lines=tail_lines(run_dir(current_app, script)), **_status(script))


@bp.route("/status.json")
def status_json(script_id):
    """The run state, polled by the script's pages; polling counts as looking at the script."""
    script = owned_script(script_id)
    mark_seen(script)
    return jsonify(**_status(script))


def _status(script):
    run = script.last_run
    return {"state": run.state if run else None,
            "exit_code": run.exit_code if run else None,
            "message": run.message if run else None}


@bp.route("/output/download")
def download_output(script_id):
    script = owned_script(script_id)
    try:
        output_file = storage.open_run_file(run_dir(current_app, script), storage.OUTPUT_FILE,
                                            storage.MAX_DOWNLOAD_BYTES)
    except FileNotFoundError:
        flash("%s has no output yet; run it first." % script.filename, "error")
        return redirect(url_for("runs.output", script_id=script.id))
    except storage.UnsafeFileError as error:
        flash("The output of %s cannot be downloaded: %s." % (script.filename, error), "error")
        return redirect(url_for("runs.output", script_id=script.id))
    if request.args.get("clean") == "1":
        return send_clean_text(output_file, script.stem + "_output_clean.txt")
    return send_run_file(output_file, script.stem + "_output.txt", "text/plain")


def send_clean_text(output_file, download_name):
    """A download of the output as a terminal shows it: every line through ``terminal_line``.

    Read line by line (a line longer than ``CLEAN_LINE_BYTES`` is cleaned in pieces),
    so a large file costs no more memory than one piece.
    """
    def lines():
        with output_file:
            reader = io.BufferedReader(output_file)
            for line in iter(lambda: reader.readline(CLEAN_LINE_BYTES), b""):
                text = line.decode("utf-8", errors="replace")
                ending = "\n" if text.endswith("\n") else ""
                yield (terminal_line(text.rstrip("\n")) + ending).encode("utf-8")

    return current_app.response_class(lines(), mimetype="text/plain", headers={
        "Content-Disposition": dump_options_header("attachment", {"filename": download_name})})


@bp.route("/images/<name>")
def image(script_id, name):
    script = owned_script(script_id)
    folder = run_dir(current_app, script)
    if name not in storage.list_images(folder):
        abort(404)
    try:
        data = storage.read_run_file(folder, os.path.join(storage.IMAGES_DIR, name),
                                     storage.MAX_IMAGE_BYTES)
    except (FileNotFoundError, storage.UnsafeFileError):  # replaced since it was listed
        abort(404)
    return send_file(io.BytesIO(data), mimetype=mimetypes.guess_type(name)[0],
                     download_name=name)


@bp.route("/techniques/<key>")
def technique(script_id, key):
    script = owned_script(script_id)
    selected = registry.get(key)
    if selected is None:
        abort(404)
    mark_seen(script)
    bokeh_script = embed_script(current_app.config["BOKEH_URL"], current_app.config["SECRET_KEY"],
                                selected.key, script.user_id, script.rel_dir)
    return render_template("scripts/technique.html", script=script, technique=selected,
                           bokeh_script=bokeh_script)


# Terminal escape sequences: CSI (colours, cursor moves, "erase line": ESC [ ... letter),
# OSC (window titles: ESC ] ... BEL or ESC \) and the short ones (ESC letter, ESC ( B).
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -/]*[0-~])")
# Keras 3's bar tells done from still-to-do by colour only (green and grey "━"); without
# colours the still-to-do part is drawn with a light line, so "8/47" does not look complete.
KERAS_BAR_TO_DO = re.compile(r"\x1b\[37m(\u2501+)\x1b\[0m")
# Control characters left after the escapes, carriage returns and backspaces were applied
# (a bell, a stray ESC); tabs stay.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def terminal_line(line):
    """One line of output as a terminal shows it: Keras' progress bar without its codes.

    Keras (``verbose=1``) redraws its bar in place on one line: backspaces and a
    carriage return, then the bar with ANSI colour codes. Here escape sequences
    are removed (the bar's grey, still-to-do part is drawn "─" instead), a carriage
    return starts the line again (only the text after the last one is kept) and a
    backspace removes the character before it.

    Args:
        line: one line of the output file, without its newline.

    Returns:
        str.
    """
    line = KERAS_BAR_TO_DO.sub(lambda m: "\u2500" * len(m.group(1)), line)
    line = ANSI_ESCAPE.sub("", line).rstrip("\r").rsplit("\r", 1)[-1]
    if "\b" in line:
        kept = []
        for character in line:
            if character != "\b":
                kept.append(character)
            elif kept:
                kept.pop()
        line = "".join(kept)
    return CONTROL_CHARACTERS.sub("", line)


def _open_output(folder):
    """(the run's output file opened as hostile input, or None; the lines to show instead)."""
    try:
        return storage.open_run_file(folder, storage.OUTPUT_FILE, float("inf")), []
    except FileNotFoundError:
        return None, []
    except storage.UnsafeFileError as error:
        return None, ["[The output cannot be shown: %s.]" % error]


def lines_from(folder, first_line, count=OUTPUT_WINDOW_LINES):
    """``count`` lines of a run's output from line ``first_line`` (counted from 1), cleaned.

    The file is read from its start up to the wanted lines, at most
    ``storage.MAX_LINE_COUNT_BYTES`` of it (no lines beyond), and at most
    ``storage.MAX_TAIL_BYTES`` of the lines themselves are kept.
    """
    output_file, lines_instead = _open_output(folder)
    if output_file is None:
        return lines_instead
    with output_file:
        reader = io.BufferedReader(output_file)
        skipped = 0
        for _ in range(first_line - 1):
            line = reader.readline(storage.MAX_TAIL_BYTES)
            skipped += len(line)
            if not line or skipped > storage.MAX_LINE_COUNT_BYTES:
                return []
        lines = []
        kept = 0
        for _ in range(count):
            line = reader.readline(storage.MAX_TAIL_BYTES - kept)
            if not line:
                break
            kept += len(line)
            lines.append(terminal_line(line.decode("utf-8", errors="replace").rstrip("\n")))
    return lines


def tail_lines(folder, count=OUTPUT_LINES):
    """The last ``count`` lines of a run's output, reading only its end, as a terminal shows them.

    Each line goes through ``terminal_line``: a progress bar redrawn in place shows
    its last state, without colour codes. (The download is the file as it is.)
    At most ``storage.MAX_TAIL_BYTES`` are read, so a huge file without newlines
    costs no more than that per request.

    Args:
        folder: the run folder; a missing output file has no lines.
        count: how many lines.

    Returns:
        list of str; one line saying why when the output file is a link, a named
        pipe or another file that is not a regular file.
    """
    output_file, lines_instead = _open_output(folder)
    if output_file is None:
        return lines_instead
    with output_file:
        end = output_file.size
        start, data = end, b""
        while start > 0 and data.count(b"\n") <= count and end - start < storage.MAX_TAIL_BYTES:
            start = max(0, start - TAIL_BLOCK_BYTES, end - storage.MAX_TAIL_BYTES)
            data = output_file.read_at(start, end - start)
    lines = data.decode("utf-8", errors="replace").split("\n")
    if start > 0 and len(lines) > 1:
        lines = lines[1:]  # the first line is cut off
    if lines and lines[-1] == "":
        lines.pop()
    return [terminal_line(line) for line in lines[-count:]]
