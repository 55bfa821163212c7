"""Runs: run and stop a script, its live output, its images and the technique tabs."""
import hashlib
import io
import mimetypes
import os
import re
import shutil
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
from visualizer.run_store import (alert_count, folder_with_row, free_a_slot_for_training,
                                  run_folder, run_rel_dir, run_script_path, script_path)
from visualizer.scripts import (chosen_run, mark_seen, owned_run, owned_script, send_run_file,
                                storage_error_text)

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
        verify_image(name, data)
        if name in (n for n, _ in images):
            raise ValueError("Two images are named %s; give them different names." % name)
        images.append((name, data))
    return images


def verify_image(name, data):
    """Raises ValueError unless ``data`` is an image Pillow reads whole, and not a bomb."""
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


def previous_images(run):
    """The images of an earlier run, read back from its folder (hostile input) and verified.

    Returns:
        list of (name, bytes), oldest first; [] when there is no such run or it had none.

    Raises:
        ValueError: an image was replaced by something that is not an image or cannot be read.
    """
    if run is None:
        return []
    folder = run_folder(current_app, run)
    images = []
    for name in storage.list_images(folder):
        try:
            data = storage.read_run_file(folder, os.path.join(storage.IMAGES_DIR, name),
                                         storage.MAX_IMAGE_BYTES)
        except (FileNotFoundError, storage.UnsafeFileError) as error:
            raise ValueError("The previous image %s cannot be read (%s); upload the images "
                             "again." % (name, error)) from None
        verify_image(name, data)
        images.append((name, data))
    return images


def create_run(script, source, images):
    """A new run of ``script``: its row and its own folder with the script and the images.

    All or nothing: when writing fails, the half-written folder is removed and the
    row is not added.

    Args:
        script: the script to run.
        source: the bytes of the script as it is now, copied into the run's folder.
        images: list of (name, bytes) of the visualization images, oldest first.

    Raises:
        OSError: the storage folder could not be written (full disk, read-only, a file
            where a folder should be); nothing is left behind.
        ValueError: a folder on the way was replaced by a link.
    """
    numbers = [r.number for r in script.runs if r.number is not None]
    run = Run(script=script, state=storage.RUN_QUEUED, number=max(numbers, default=0) + 1,
              script_sha256=hashlib.sha256(source).hexdigest(), images=[n for n, _ in images])
    with folder_with_row() as fresh:
        db.session.add(run)
        db.session.flush()  # the run's id names its folder
        folder = run_folder(current_app, run)
        check_no_links(current_app.config["STORAGE_DIR"], os.path.dirname(folder), script)
        fresh(folder)
        with open(os.path.join(folder, script.filename), "wb") as f:
            f.write(source)
        # Written in order, so the last one is the newest (see storage.list_images).
        os.mkdir(storage.images_dir(folder))
        for index, (name, data) in enumerate(images):
            path = os.path.join(storage.images_dir(folder), name)
            with open(path, "wb") as f:
                f.write(data)
            os.utime(path, ns=(index, index))
    return run, folder


def check_no_links(storage_dir, folder, script):
    """Raises ValueError when ``folder`` or a folder between it and ``storage_dir`` is a link:
    a run's folder is made and later deleted there, never where a link points."""
    relative = os.path.relpath(folder, storage_dir)
    path = storage_dir
    for part in relative.split(os.sep):
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise ValueError("The folder of %s was replaced by a link; delete the file and "
                             "upload it again." % script.filename)


@bp.route("/run", methods=("POST",))
def run(script_id):
    script = owned_script(script_id)
    overview = url_for("scripts.overview", script_id=script.id)
    if script.is_active:
        flash("%s is already %s." % (script.filename, script.last_run.state), "error")
        return redirect(overview)
    choice = request.form.get("images", "new")
    try:
        if choice not in ("new", "keep", "none"):
            raise ValueError("Choose new image(s), the previous image(s) or no image.")
        if choice == "new":
            images = check_images(request.files.getlist("image"))
            if not images:
                raise ValueError("Choose a visualization image to upload, or keep the previous "
                                 "one.")
        elif choice == "keep":
            images = previous_images(script.last_run)
            if not images:
                raise ValueError("There is no previous image to keep; upload one.")
        else:
            images = []
        with open(script_path(current_app, script), "rb") as f:
            source = f.read()
        quotas.check_new_run(script.user_id, len(source) + sum(len(d) for _, d in images))
        new_run, folder = create_run(script, source, images)
    except ValueError as error:
        flash(str(error), "error")
        return redirect(overview)
    except OSError as error:
        flash("Could not prepare the run: %s. Nothing was changed; the earlier runs are kept. "
              "The storage folder of the server needs attention (free space, permissions)."
              % storage_error_text(error), "error")
        return redirect(overview)
    try:
        free_a_slot_for_training(current_app, new_run)
        current_app.extensions["runner"].start(
            new_run.id, folder, run_script_path(current_app, new_run),
            disk_limit_mb=quotas.run_disk_limit_mb(script.user_id, folder))
    except Exception as error:
        new_run.state, new_run.message = storage.RUN_FAILED, "could not start: %s" % error
        db.session.commit()
        flash("%s could not be started: %s" % (script.filename, error), "error")
        return redirect(overview)
    flash("%s was queued to run." % script.filename, "success")
    return redirect(overview)


@bp.route("/runs/<int:run_id>/delete", methods=("POST",))
def delete_run(script_id, run_id):
    """Deletes one run: its folder and its row; refused while the run is active."""
    script = owned_script(script_id)
    run = owned_run(script, run_id)
    overview = url_for("scripts.overview", script_id=script.id)
    if run.is_active:
        flash("Run %s of %s is %s; stop it before deleting it." % (
            run.number, script.filename, run.state), "error")
        return redirect(overview)
    folder, number = run_folder(current_app, run), run.number
    db.session.delete(run)
    db.session.commit()
    if os.path.islink(folder):  # a run replaced its folder by a link: only the link goes
        os.unlink(folder)
    shutil.rmtree(folder, ignore_errors=True)
    flash("Run %s of %s and all its results were deleted." % (number, script.filename),
          "success")
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
    run = chosen_run(script)
    mark_seen(script)
    folder = run and run_folder(current_app, run)
    first_line = request.args.get("from", type=int)
    if first_line is not None and first_line >= 1:
        lines = lines_from(folder, first_line) if folder else []
    else:
        first_line, lines = None, tail_lines(folder) if folder else []
    return render_template("scripts/output.html", script=script, run=run, lines=lines,
                           first_line=first_line, window=OUTPUT_WINDOW_LINES,
                           has_output=bool(folder) and storage.is_run_file(folder,
                                                                           storage.OUTPUT_FILE))


@bp.route("/output.json")
def output_json(script_id):
    script = owned_script(script_id)
    run = chosen_run(script)
    return jsonify(lines=tail_lines(run_folder(current_app, run)) if run else [], **_status(run))


@bp.route("/status.json")
def status_json(script_id):
    """The chosen run's state and alert count, polled by the script's pages; polling counts
    as looking at the script."""
    script = owned_script(script_id)
    run = chosen_run(script)
    mark_seen(script)
    return jsonify(**_status(run))


def _status(run):
    return {"run": run.id if run else None,
            "state": run.state if run else None,
            "exit_code": run.exit_code if run else None,
            "message": run.message if run else None,
            "alert_count": alert_count(current_app, run) if run else 0}


@bp.route("/alerts.json")
def alerts_json(script_id):
    """The chosen run's alerts, oldest first, for the Overview's live list."""
    script = owned_script(script_id)
    run = chosen_run(script)
    alerts, problem = storage.read_alerts(run_folder(current_app, run)) if run else ([], "")
    return jsonify(alerts=alerts, problem=problem)


@bp.route("/output/download")
def download_output(script_id):
    script = owned_script(script_id)
    run = chosen_run(script)
    back = url_for("runs.output", script_id=script.id, run=request.args.get("run"))
    try:
        if run is None:
            raise FileNotFoundError
        output_file = storage.open_run_file(run_folder(current_app, run), storage.OUTPUT_FILE,
                                            storage.MAX_DOWNLOAD_BYTES)
    except FileNotFoundError:
        flash("%s has no output yet; run it first." % script.filename, "error")
        return redirect(back)
    except storage.UnsafeFileError as error:
        flash("The output of %s cannot be downloaded: %s." % (script.filename, error), "error")
        return redirect(back)
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
    run = chosen_run(script)
    folder = run and run_folder(current_app, run)
    if not folder or name not in storage.list_images(folder):
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
    run = chosen_run(script)
    selected = registry.get(key)
    if selected is None:
        abort(404)
    mark_seen(script)
    bokeh_script = run and embed_script(current_app.config["BOKEH_URL"],
                                        current_app.config["SECRET_KEY"], selected.key,
                                        script.user_id, run_rel_dir(run))
    return render_template("scripts/technique.html", script=script, run=run, technique=selected,
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
