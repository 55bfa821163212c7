"""Explore: a trained model and some inputs, analysed by a job in the runner (issue 13).

The server never imports keras: an exploration's folder gets the model, the inputs and
a tiny job script (``custom_keras.explore``), which the runner starts like a training
script. The job writes its results into the folder and then answers requests (a
layer's activations, a technique for one image) that the server writes there, until it
has been idle for ``EXPLORE_IDLE_S``; a request to an ended job starts it again. The
folder is read as hostile input, like every run folder (``storage.read_json``).
"""
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import time
import zipfile

from flask import (Blueprint, Response, abort, current_app, flash, jsonify, redirect,
                   render_template, request, url_for)
from flask_login import current_user
from werkzeug.http import dump_options_header
from werkzeug.utils import secure_filename

from custom_keras import storage
from visualizer import quotas
from visualizer.models import (ACTIVE_STATES, FAILED, FILTER_MARKS, Exploration, FilterMark, Run,
                               Script, db)
from visualizer.run_store import exploration_dir, folder_with_row, run_folder
from visualizer.runner import _memory_message
from visualizer.runs import check_images
from visualizer.scripts import storage_error_text

bp = Blueprint("explore", __name__, url_prefix="/explore")

STARTING, READY, FAILED_STATE, ENDED = "starting", "ready", "failed", "ended"
COMPUTE_TECHNIQUES = ("deconvolution", "deep_visualization", "grad_cam", "all")
MAX_CLASS_NAMES = 100000
MAX_CLASS_NAME_LENGTH = 200
MAX_NAME_LENGTH = 255
MAX_CLASS_NAMES_BYTES = 4 * storage.MIB
MAX_PNG_BYTES = 16 * storage.MIB
# How long a layer request waits for the job before the page is told to ask again (a
# server thread waits meanwhile; the job answers within a second once it has loaded).
LAYER_WAIT_S = 3.0
LAYER_POLL_S = 0.02
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
RESULT_FILE = re.compile(r"[A-Za-z0-9_-]{1,80}\.png")
JOB_SCRIPT = ("# The analysis job of an exploration, written by the server at every start.\n"
              "import os\n\n"
              "from custom_keras import explore\n\n"
              "explore.main(os.path.dirname(os.path.abspath(__file__)))\n")
# What a model file must hold to be a Keras archive (keras.saving's .keras format).
KERAS_ARCHIVE_MEMBERS = ("config.json", "metadata.json")
DEMO_CLASS_NAMES = [str(digit) for digit in range(10)]


class UploadError(ValueError):
    """Bad input for a new exploration; the message says what and how to fix it."""


def owned_exploration(exploration_id):
    """The current user's exploration with this id; 404 for another user's or a missing one."""
    exploration = db.session.get(Exploration, exploration_id)
    if exploration is None or exploration.user_id != current_user.id:
        abort(404)
    return exploration


def explore_urls(exploration):
    """The JSON endpoints of one exploration, as the explorer page gets them."""
    ids = {"exploration_id": exploration.id}
    return {
        "state": url_for("explore.state", **ids),
        "predictions": url_for("explore.predictions", **ids),
        "architecture": url_for("explore.architecture", **ids),
        # the node id and ".json" are appended by the page: <layers>/<node id>.json?image=<name>
        "layers": url_for("explore.index") + "%d/layers" % exploration.id,
        "compute": url_for("explore.compute", **ids),
        "marks": url_for("explore.marks", **ids),
        "set_mark": url_for("explore.set_mark", **ids),
        "marks_download": url_for("explore.download_marks", **ids),
        "delete": url_for("explore.delete", **ids),
    }


# --- checking the upload (nothing is written before all of it is checked) -------------------

def check_model_file(stream, name, max_bytes):
    """Checks a model file before anything is written: a Keras archive, complete and readable.

    Args:
        stream: a seekable binary file.
        name: the file name shown in messages.
        max_bytes: the largest size accepted.

    Returns:
        the sha256 hex digest of the file.

    Raises:
        UploadError: the file is too large, not a ``.keras`` archive, or damaged.
    """
    stream.seek(0, os.SEEK_END)
    size = stream.tell()
    stream.seek(0)
    if size > max_bytes:
        raise UploadError("%s is %s, larger than the limit of %s for a model; nothing was saved."
                          % (name, storage.format_bytes(size), storage.format_bytes(max_bytes)))
    how = ("Save the model with model.save('name.keras') (Keras 3) and upload that file.")
    try:
        with zipfile.ZipFile(stream) as archive:
            members = set(archive.namelist())
            missing = [m for m in KERAS_ARCHIVE_MEMBERS if m not in members]
            if missing:
                raise UploadError("%s is a zip archive but not a Keras model: it has no %s. %s"
                                  % (name, " and no ".join(missing), how))
            damaged = archive.testzip()
            if damaged is not None:
                raise UploadError("%s is a damaged .keras file: its part %s does not match its "
                                  "checksum. Save the model again and upload the new file."
                                  % (name, damaged))
            try:
                json.loads(archive.read("config.json"))
            except ValueError:
                raise UploadError("%s is a damaged .keras file: its config.json is not JSON. "
                                  "Save the model again and upload the new file." % name) from None
    except zipfile.BadZipFile as error:
        raise UploadError("%s is not a Keras model file (a .keras file is a zip archive; this one "
                          "cannot be opened: %s). %s" % (name, error, how)) from None
    except (zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as error:
        raise UploadError("%s is a damaged .keras file (%s). Save the model again and upload "
                          "the new file." % (name, error)) from None
    stream.seek(0)
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(storage.MIB), b""):
        digest.update(block)
    stream.seek(0)
    return digest.hexdigest()


def check_inputs(uploads):
    """The inputs of a new exploration: images, or one ``.npy`` array of samples.

    Returns:
        ("images", [(name, bytes)]) or ("array", bytes).

    Raises:
        UploadError: no input, a mix of both kinds, an unreadable image, or an array
            that is not a numeric NumPy array.
    """
    uploads = [u for u in uploads if u and u.filename]
    arrays = [u for u in uploads if u.filename.lower().endswith(".npy")]
    if not uploads:
        raise UploadError("Choose one or more images (PNG or JPEG), or an .npy array file, to "
                          "show the model.")
    if arrays:
        if len(uploads) > 1:
            raise UploadError("Give either images or one .npy array file, not both or several "
                              "arrays.")
        return "array", check_array_file(arrays[0])
    try:
        return "images", check_images(uploads)
    except ValueError as error:
        raise UploadError(str(error)) from None


def check_array_file(upload):
    """The bytes of an ``.npy`` file holding a numeric array (no pickled objects)."""
    import numpy as np

    data = upload.read()
    name = secure_filename(upload.filename) or "the array file"
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UploadError("%s is not a NumPy array file (.npy, saved with numpy.save): %s."
                          % (name, error)) from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf" or array.ndim < 1 \
            or array.size == 0:
        raise UploadError("%s must hold a non-empty array of numbers; it holds %s of %s."
                          % (name, getattr(array, "shape", "?"), getattr(array, "dtype", "?")))
    return data


def check_class_names(upload):
    """Class names from a ``.txt`` file (one per line) or a ``.json`` list, or None.

    Their number is checked against the model's outputs by the job, which knows it.

    Raises:
        UploadError: not UTF-8, not a list of strings, empty, too many or too long names.
    """
    if upload is None or not upload.filename:
        return None
    name = secure_filename(upload.filename) or "the class names file"
    data = upload.read(MAX_CLASS_NAMES_BYTES + 1)
    if len(data) > MAX_CLASS_NAMES_BYTES:
        raise UploadError("%s is larger than %s; class names are one short line each."
                          % (name, storage.format_bytes(MAX_CLASS_NAMES_BYTES)))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UploadError("%s is not a UTF-8 text file." % name) from None
    if name.lower().endswith(".json"):
        try:
            names = json.loads(text)
        except ValueError as error:
            raise UploadError("%s is not JSON (%s); give a list of names, e.g. "
                              '["cat", "dog"].' % (name, error)) from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UploadError('%s must hold a JSON list of strings, e.g. ["cat", "dog"].' % name)
    elif name.lower().endswith(".txt"):
        names = text.splitlines()
        while names and not names[-1].strip():
            names.pop()
    else:
        raise UploadError("%s is neither a .txt file (one class name per line) nor a .json list."
                          % name)
    names = [n.strip() for n in names]
    if not names:
        raise UploadError("%s holds no class names." % name)
    if len(names) > MAX_CLASS_NAMES:
        raise UploadError("%s holds %d class names, more than %d." % (name, len(names),
                                                                      MAX_CLASS_NAMES))
    too_long = next((n for n in names if len(n) > MAX_CLASS_NAME_LENGTH), None)
    if too_long is not None:
        raise UploadError("The class name %s... is longer than %d characters."
                          % (too_long[:40], MAX_CLASS_NAME_LENGTH))
    return names


def model_of_run(choice):
    """(file name, readable stream) of a network one of the user's runs saved.

    ``choice`` is "<run id>" (the run's newest network) or "<run id>:<epoch>" (the network
    it kept after that epoch, ``register_network_saver(keep_epochs=True)``).
    """
    run_id, _, epoch = str(choice).partition(":")
    try:
        run = db.session.get(Run, int(run_id))
        epoch = int(epoch) if epoch else None
    except (TypeError, ValueError):
        run = None
    if run is None or run.script is None or run.script.user_id != current_user.id:
        raise UploadError("Choose one of your runs with a saved network, or upload a .keras "
                          "file.")
    script = run.script
    label = "Run %d of %s" % (run.number or run.id, script.filename)
    if epoch is not None:
        label += ", epoch %d," % epoch
    path = (storage.network_file(script.stem) if epoch is None
            else storage.network_epoch_file(script.stem, epoch))
    try:
        data = storage.read_run_file(run_folder(current_app, run), path, model_limit_bytes())
    except FileNotFoundError:
        raise UploadError("%s has no saved network: run the script with "
                          "callbacks.register_network_saver()." % label) from None
    except storage.FileTooLargeError:
        raise UploadError("The saved network of %s is larger than the limit of %s for a model."
                          % (label, storage.format_bytes(model_limit_bytes()))) from None
    except storage.UnsafeFileError as error:
        raise UploadError("The saved network of %s cannot be read: %s." % (label, error)
                          ) from None
    name = script.stem + (".keras" if epoch is None else "-epoch-%d.keras" % epoch)
    return name, io.BytesIO(data)


def saved_networks(user_id):
    """[(choice, label)] of every network the user's runs saved: each run's newest, then the
    epochs it kept, for the new-exploration form."""
    choices = []
    runs = (Run.query.join(Script).filter(Script.user_id == user_id)
            .order_by(Script.filename, Run.id.desc()))
    for run in runs:
        folder, stem = run_folder(current_app, run), run.script.stem
        label = "%s \u00b7 run %s" % (run.script.filename, run.number or run.id)
        if storage.is_run_file(folder, storage.network_file(stem)):
            choices.append((str(run.id), "%s, newest (%s)" % (label, run.state)))
        choices += [("%d:%d" % (run.id, epoch), "%s, epoch %d" % (label, epoch))
                    for epoch in storage.list_network_epochs(folder, stem)]
    return choices


def model_limit_bytes():
    return int(current_app.config["EXPLORE_MODEL_MB"] * storage.MIB)


# --- creating an exploration: all or nothing ---------------------------------------------------

def create_exploration(name, source, model_stream, digest, inputs, class_names, notices=()):
    """Adds an exploration: its row and its folder with the model, inputs and class names.

    All or nothing: if anything fails, the folder is removed and the row is not added.

    Args:
        name: shown in the list.
        source: "upload", "run" or "demo".
        model_stream: a readable binary file of the checked model.
        digest: its sha256.
        inputs: ("images", [(name, bytes)]) or ("array", bytes).
        class_names: list of str, or None.
        notices: what was noticed at upload, shown on the page.

    Returns:
        the new ``Exploration`` (committed).

    Raises:
        OSError: the storage folder could not be written; nothing is left.
    """
    exploration = Exploration(user_id=current_user.id, name=name[:MAX_NAME_LENGTH], source=source,
                              model_sha256=digest, notices=json.dumps(list(notices)),
                              class_names=None if class_names is None else json.dumps(class_names))
    with folder_with_row() as fresh:
        db.session.add(exploration)
        db.session.flush()  # the id names the folder
        folder = fresh(exploration_dir(current_app, exploration))
        with open(os.path.join(folder, storage.EXPLORE_MODEL_FILE), "wb") as f:
            shutil.copyfileobj(model_stream, f, storage.MIB)
        kind, data = inputs
        if kind == "array":
            _write_new(os.path.join(folder, storage.EXPLORE_INPUTS_FILE), data)
        else:
            os.makedirs(storage.images_dir(folder))
            for index, (image_name, image_data) in enumerate(data):
                path = os.path.join(storage.images_dir(folder), image_name)
                _write_new(path, image_data)
                os.utime(path, ns=(index, index))  # the upload's order (storage.list_images)
        if class_names is not None:
            _write_new(os.path.join(folder, storage.EXPLORE_CLASS_NAMES_FILE),
                       json.dumps(class_names).encode("utf-8"))
        os.makedirs(os.path.join(folder, storage.EXPLORE_REQUESTS_DIR))
    return exploration


def _write_new(path, data):
    with open(path, "wb") as f:
        f.write(data)


def start_job(exploration):
    """Starts the exploration's analysis job as a new run (its earlier results are kept).

    Returns:
        None, or why it could not be started.
    """
    app = current_app
    folder = exploration_dir(app, exploration)
    try:
        storage.atomic_write_bytes(os.path.join(folder, storage.EXPLORE_SCRIPT_FILE),
                                   JOB_SCRIPT.encode("utf-8"))
        storage.atomic_write_json(os.path.join(folder, storage.EXPLORE_SETTINGS_FILE),
                                  {"idle_s": app.config["EXPLORE_IDLE_S"]})
        # An earlier run's results stay (the page keeps showing them while the job loads
        # again); only its failure goes.
        storage.remove_run_file(folder, storage.results_path(folder,
                                                             storage.EXPLORE_FAILURE_FILE))
        disk_limit_mb = quotas.exploration_disk_limit_mb(exploration.user_id, folder)
    except (OSError, ValueError) as error:
        return "could not prepare the job: %s" % (
            storage_error_text(error) if isinstance(error, OSError) else error)
    run = Run(exploration=exploration, state=storage.RUN_QUEUED)
    db.session.add(run)
    db.session.commit()
    try:
        app.extensions["runner"].start(run.id, folder, storage.EXPLORE_SCRIPT_FILE,
                                       disk_limit_mb=disk_limit_mb)
    except Exception as error:
        run.state, run.message = storage.RUN_FAILED, "could not start: %s" % error
        db.session.commit()
        return run.message
    return None


def ensure_job(exploration):
    """Starts the job again when it has ended (a request needs it); None or why not."""
    if exploration.is_active:
        return None
    return start_job(exploration)


# --- pages -----------------------------------------------------------------------------------

@bp.route("/")
def index():
    return _index_page()


def _index_page(status=200):
    explorations = (Exploration.query.filter_by(user_id=current_user.id)
                    .order_by(Exploration.created_at.desc(), Exploration.id.desc()).all())
    networks = saved_networks(current_user.id)
    states = {e.id: exploration_state(e)["state"] for e in explorations}
    demo_ready = os.path.isfile(os.path.join(current_app.config["DEMO_DIR"],
                                             storage.EXPLORE_MODEL_FILE))
    return render_template("explore/index.html", explorations=explorations, states=states,
                           networks=networks, demo_ready=demo_ready,
                           model_limit=storage.format_bytes(model_limit_bytes())), status


def allow_model_upload():
    """A new exploration's request may be larger than other uploads by the model's cap.

    Registered on the app before the CSRF check, which reads the form (and so the body).
    """
    if request.endpoint == "explore.new":
        request.max_content_length = largest_request_bytes(current_app)


def largest_request_bytes(app):
    """The largest body the app takes: a new exploration's (a model and the usual uploads)."""
    return int(app.config["EXPLORE_MODEL_MB"] * storage.MIB) + app.config["MAX_CONTENT_LENGTH"]


@bp.route("/new", methods=("POST",))
def new():
    # a body over the limit never gets here: the app's 413 page says the limit
    files, form = request.files, request.form
    try:
        model_upload = files.get("model")
        if model_upload is not None and model_upload.filename:
            model_name = secure_filename(model_upload.filename) or "model.keras"
            if not model_name.lower().endswith(".keras"):
                raise UploadError("%s is not a Keras model file: choose a .keras file (saved "
                                  "with model.save('name.keras'))." % model_upload.filename)
            source, model_stream = "upload", model_upload.stream
        elif form.get("run_id"):
            source = "run"
            model_name, model_stream = model_of_run(form.get("run_id"))
        else:
            raise UploadError("Choose a .keras model file to upload, or one of your runs with a "
                              "saved network.")
        digest = check_model_file(model_stream, model_name, model_limit_bytes())
        inputs = check_inputs(files.getlist("inputs"))
        class_names = check_class_names(files.get("class_names"))
        name = form.get("name", "").strip() or model_name
        quotas.check_exploration_upload(current_user.id,
                                        _stream_size(model_stream) + _inputs_bytes(inputs))
    except (UploadError, quotas.QuotaExceeded) as error:
        flash(str(error), "error")
        return _index_page(400)
    return _create_and_start(name, source, model_stream, digest, inputs, class_names)


def _inputs_bytes(inputs):
    kind, data = inputs
    return len(data) if kind == "array" else sum(len(image) for _, image in data)


def _stream_size(stream):
    stream.seek(0, os.SEEK_END)
    size = stream.tell()
    stream.seek(0)
    return size


def _create_and_start(name, source, model_stream, digest, inputs, class_names):
    try:
        exploration = create_exploration(name, source, model_stream, digest, inputs, class_names)
    except OSError as error:
        flash("Could not save the exploration: %s. Nothing was saved; the storage folder of the "
              "server needs attention (free space, permissions)." % storage_error_text(error),
              "error")
        return _index_page(500)
    problem = start_job(exploration)
    if problem:
        flash("The analysis of %s could not be started: %s" % (exploration.name, problem), "error")
    return redirect(url_for("explore.view", exploration_id=exploration.id))


@bp.route("/demo", methods=("POST",))
def demo():
    """A new exploration of the demo model (trained by scripts/setup.sh) and its digit images."""
    folder = current_app.config["DEMO_DIR"]
    try:
        with open(os.path.join(folder, storage.EXPLORE_MODEL_FILE), "rb") as f:
            model = io.BytesIO(f.read())
        images = []
        for image_name in sorted(os.listdir(os.path.join(folder, storage.IMAGES_DIR))):
            if image_name.lower().endswith(storage.IMAGE_EXTENSIONS):
                with open(os.path.join(folder, storage.IMAGES_DIR, image_name), "rb") as f:
                    images.append((image_name, f.read()))
        if not images:
            raise FileNotFoundError("no demo images")
        digest = check_model_file(model, "The demo model", model_limit_bytes())
        quotas.check_exploration_upload(current_user.id, len(model.getvalue()) + _inputs_bytes(
            ("images", images)))
    except (OSError, UploadError) as error:
        flash("The demo is not installed on this server (%s): the operator sets it up with "
              "bash scripts/setup.sh." % (storage_error_text(error)
                                          if isinstance(error, OSError) else error), "error")
        return redirect(url_for("explore.index"))
    except quotas.QuotaExceeded as error:
        flash(str(error), "error")
        return redirect(url_for("explore.index"))
    return _create_and_start("Demo: digits", "demo", model, digest, ("images", images),
                             DEMO_CLASS_NAMES)


@bp.route("/<int:exploration_id>")
def view(exploration_id):
    exploration = owned_exploration(exploration_id)
    return render_template("explore/view.html", exploration=exploration,
                           urls=explore_urls(exploration))


@bp.route("/<int:exploration_id>/delete", methods=("POST",))
def delete(exploration_id):
    """Deletes an exploration: its job is stopped first, then its rows and its folder go."""
    exploration = owned_exploration(exploration_id)
    runner = current_app.extensions["runner"]
    for run in exploration.runs:
        if run.state in ACTIVE_STATES:
            runner.stop(run.id)
    folder = exploration_dir(current_app, exploration)
    name = exploration.name
    db.session.delete(exploration)
    db.session.commit()
    shutil.rmtree(folder, ignore_errors=True)
    flash("The exploration %s and its results were deleted." % name, "success")
    return redirect(url_for("explore.index"))


# --- the job's results -------------------------------------------------------------------------

def _read_result(folder, file_name):
    """A JSON result of the job, or None when it is missing or not readable."""
    try:
        return storage.read_json(folder, storage.results_path(folder, file_name))
    except (FileNotFoundError, storage.UnsafeFileError, ValueError):
        return None


def exploration_state(exploration):
    """The state the page shows (see the contract): starting, ready, failed or ended."""
    folder = exploration_dir(current_app, exploration)
    ready = _read_result(folder, storage.EXPLORE_READY_FILE)
    ready = ready if isinstance(ready, dict) else None
    run = exploration.last_run
    message = None
    if run is not None and run.state in ACTIVE_STATES:
        state = READY if ready else STARTING
    elif run is not None and run.state == FAILED or not ready:
        state, message = FAILED_STATE, failure_message(folder, run)
    else:
        state = ENDED
    notices = json.loads(exploration.notices or "[]")
    images = []
    if ready:
        notices += [n for n in ready.get("notices", []) if isinstance(n, str)]
        for index, image in enumerate(ready.get("images", [])):
            if isinstance(image, dict) and isinstance(image.get("name"), str):
                images.append({"name": image["name"], "url": url_for(
                    "explore.input_png", exploration_id=exploration.id, index=index)
                    if image.get("png") else None})
    return {"state": state, "message": message, "notices": notices, "images": images}


def failure_message(folder, run):
    """Why the job failed, in words: the job's own message, else the runner's."""
    failure = _read_result(folder, storage.EXPLORE_FAILURE_FILE)
    if isinstance(failure, dict) and isinstance(failure.get("message"), str):
        return failure["message"]
    if run is None:
        return "The analysis job was never started."
    limit_mb = current_app.config["RUN_MEMORY_MB"]
    if limit_mb and run.message == _memory_message(limit_mb):
        return ("The model needs more memory than the limit of %g MB of one analysis; the "
                "server's operator sets the limit (VISUALIZER_RUN_MEMORY_MB)." % limit_mb)
    if run.message:
        return "The analysis job %s." % run.message
    return "The analysis job ended before it had analysed the model."


@bp.route("/<int:exploration_id>/state.json")
def state(exploration_id):
    return jsonify(exploration_state(owned_exploration(exploration_id)))


def _pending(message, status=202):
    return jsonify({"pending": True, "message": message}), status


def _result_json(exploration, file_name):
    folder = exploration_dir(current_app, exploration)
    result = _read_result(folder, file_name)
    if not isinstance(result, dict):
        return _pending("Not analysed yet: the analysis job is still loading the model.")
    return jsonify(result)


@bp.route("/<int:exploration_id>/predictions.json")
def predictions(exploration_id):
    return _result_json(owned_exploration(exploration_id), storage.EXPLORE_PREDICTIONS_FILE)


@bp.route("/<int:exploration_id>/architecture.json")
def architecture(exploration_id):
    return _result_json(owned_exploration(exploration_id), storage.EXPLORE_ARCHITECTURE_FILE)


def _known(exploration, node_id, image_name):
    """Raises 404 unless the node is in the architecture and the image is one of the inputs."""
    folder = exploration_dir(current_app, exploration)
    graph = _read_result(folder, storage.EXPLORE_ARCHITECTURE_FILE)
    ready = _read_result(folder, storage.EXPLORE_READY_FILE)
    nodes = graph.get("nodes", []) if isinstance(graph, dict) else []
    images = ready.get("images", []) if isinstance(ready, dict) else []
    if node_id is not None and not any(isinstance(n, dict) and n.get("id") == node_id
                                       for n in nodes):
        abort(404)
    if image_name is not None and not any(isinstance(i, dict) and i.get("name") == image_name
                                          for i in images):
        abort(404)


@bp.route("/<int:exploration_id>/layers/<path:node_id>.json")
def layer(exploration_id, node_id):
    """One layer's activations for one image: from the job's file, computed on request."""
    exploration = owned_exploration(exploration_id)
    image_name = request.args.get("image", "")
    folder = exploration_dir(current_app, exploration)
    path = storage.layer_path(folder, node_id, image_name)
    deadline = time.monotonic() + LAYER_WAIT_S
    requested = False
    while True:
        try:
            result = storage.read_json(folder, path)
        except (FileNotFoundError, ValueError):  # not there, or being replaced
            result = None
        except storage.UnsafeFileError as error:
            return jsonify({"message": "The layer's result cannot be read: %s." % error}), 500
        if isinstance(result, dict):
            return jsonify(result)
        if not requested:
            _known(exploration, node_id, image_name)
            problem = _request(exploration, {"kind": "layer", "node": node_id,
                                             "image": image_name})
            if problem:
                return jsonify({"message": problem}), 503
            requested = True
            if exploration.last_run.state == storage.RUN_QUEUED:
                return _pending("The analysis job waits for a free run slot; ask again.")
        if time.monotonic() > deadline:
            return _pending("The analysis job is computing this layer; ask again.")
        time.sleep(LAYER_POLL_S)


def _request(exploration, request_body, request_id=None):
    """Writes a request for the job and makes sure the job runs; None or why it failed."""
    folder = exploration_dir(current_app, exploration)
    request_id = request_id or secrets.token_hex(16)
    try:
        storage.write_request(folder, request_id, request_body)
    except OSError as error:
        return "The request could not be written: %s." % storage_error_text(error)
    return ensure_job(exploration)


@bp.route("/<int:exploration_id>/compute", methods=("POST",))
def compute(exploration_id):
    """Asks the job for a technique at a layer for one image; the answer is polled."""
    exploration = owned_exploration(exploration_id)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify({"message": "Send a JSON object: technique, node, image, unit."}), 400
    technique, node_id = body.get("technique"), body.get("node")
    image_name, unit = body.get("image"), body.get("unit")
    if technique not in COMPUTE_TECHNIQUES:
        return jsonify({"message": "technique must be one of %s." % ", ".join(
            COMPUTE_TECHNIQUES)}), 400
    if not isinstance(image_name, str) or (node_id is not None and not isinstance(node_id, str)):
        return jsonify({"message": "image must be an image's name and node a node id or null."}
                       ), 400
    if unit is not None and (not isinstance(unit, int) or isinstance(unit, bool) or unit < 0):
        return jsonify({"message": "unit must be a filter or unit number (0 or more) or null."}
                       ), 400
    _known(exploration, node_id, image_name)
    request_id = secrets.token_hex(16)
    problem = _request(exploration, {"kind": "compute", "technique": technique, "node": node_id,
                                     "image": image_name, "unit": unit}, request_id)
    if problem:
        return jsonify({"message": problem}), 503
    return jsonify({"request": request_id, "poll": url_for(
        "explore.compute_result", exploration_id=exploration.id, request_id=request_id)}), 202


@bp.route("/<int:exploration_id>/compute/<request_id>.json")
def compute_result(exploration_id, request_id):
    exploration = owned_exploration(exploration_id)
    if not REQUEST_ID.fullmatch(request_id):
        abort(404)
    folder = exploration_dir(current_app, exploration)
    try:
        response = storage.read_json(folder, storage.compute_path(folder, request_id + ".json"))
    except FileNotFoundError:
        response = None
    except (storage.UnsafeFileError, ValueError) as error:
        response = {"state": "failed", "message": "The answer cannot be read: %s." % error}
    if not isinstance(response, dict):
        if not storage.is_run_file(folder, os.path.join(storage.EXPLORE_REQUESTS_DIR,
                                                        request_id + ".json")):
            abort(404)
        if not exploration.is_active:
            return jsonify({"state": "failed", "results": [], "message": failure_message(
                folder, exploration.last_run) if exploration.last_run and
                exploration.last_run.state == FAILED else
                "The analysis job ended before it answered; request it again."})
        return jsonify({"state": "pending", "message": None, "results": []})
    results = []
    for result in response.get("results", []) if isinstance(response.get("results"), list) else []:
        if not isinstance(result, dict):
            continue
        entry = {key: result.get(key) if isinstance(result.get(key), str) else ""
                 for key in ("key", "title", "what", "how", "misleads", "caption")}
        image = result.get("image")
        entry["image_url"] = url_for(
            "explore.compute_png", exploration_id=exploration.id, request_id=request_id,
            file_name=image) if isinstance(image, str) and RESULT_FILE.fullmatch(image) else None
        results.append(entry)
    state = response.get("state") if response.get("state") in ("done", "failed") else "failed"
    message = response.get("message") if isinstance(response.get("message"), str) else None
    return jsonify({"state": state, "message": message, "results": results})


def _send_png(folder, path):
    try:
        data = storage.read_run_file(folder, path, MAX_PNG_BYTES)
    except (FileNotFoundError, storage.UnsafeFileError):
        abort(404)
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        abort(404)
    return Response(data, mimetype="image/png", headers={"Cache-Control": "no-store"})


@bp.route("/<int:exploration_id>/compute/<request_id>/<file_name>")
def compute_png(exploration_id, request_id, file_name):
    exploration = owned_exploration(exploration_id)
    if not (REQUEST_ID.fullmatch(request_id) and RESULT_FILE.fullmatch(file_name)
            and file_name.startswith(request_id)):
        abort(404)
    folder = exploration_dir(current_app, exploration)
    return _send_png(folder, storage.compute_path(folder, file_name))


@bp.route("/<int:exploration_id>/inputs/<int:index>.png")
def input_png(exploration_id, index):
    """An input as the model was fed it (resized, grey or colour), drawn by the job."""
    exploration = owned_exploration(exploration_id)
    folder = exploration_dir(current_app, exploration)
    return _send_png(folder, storage.results_path(
        folder, os.path.join(storage.EXPLORE_INPUT_PNG_DIR, "%d.png" % index)))


# --- filter marks: per user and model --------------------------------------------------------

def _marks(exploration):
    marks = {}
    for mark in FilterMark.query.filter_by(user_id=current_user.id,
                                           model_sha256=exploration.model_sha256):
        marks.setdefault(mark.node, {})[str(mark.filter_index)] = mark.mark
    return marks


@bp.route("/<int:exploration_id>/marks.json")
def marks(exploration_id):
    return jsonify(_marks(owned_exploration(exploration_id)))


@bp.route("/<int:exploration_id>/marks", methods=("POST",))
def set_mark(exploration_id):
    """Marks a filter good or bad, or unmarks it (mark null); returns all marks of the model."""
    exploration = owned_exploration(exploration_id)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify({"message": "Send a JSON object: node, filter, mark."}), 400
    node_id, index, mark = body.get("node"), body.get("filter"), body.get("mark")
    if (not isinstance(node_id, str) or not node_id or len(node_id) > 255
            or not isinstance(index, int) or isinstance(index, bool) or index < 0
            or (mark is not None and mark not in FILTER_MARKS)):
        return jsonify({"message": 'node must be a node id, filter a filter number (0 or more) '
                                   'and mark "good", "bad" or null.'}), 400
    row = FilterMark.query.filter_by(user_id=current_user.id,
                                     model_sha256=exploration.model_sha256, node=node_id,
                                     filter_index=index).first()
    if mark is None:
        if row is not None:
            db.session.delete(row)
    elif row is None:
        db.session.add(FilterMark(user_id=current_user.id, model_sha256=exploration.model_sha256,
                                  node=node_id, filter_index=index, mark=mark))
    else:
        row.mark = mark
    db.session.commit()
    return jsonify(_marks(exploration))


@bp.route("/<int:exploration_id>/marks/download")
def download_marks(exploration_id):
    exploration = owned_exploration(exploration_id)
    name = "filter-marks-%s.json" % exploration.model_sha256[:12]
    return Response(json.dumps(_marks(exploration), indent=2, sort_keys=True),
                    mimetype="application/json", headers={
                        "Content-Disposition": dump_options_header("attachment",
                                                                   {"filename": name})})
