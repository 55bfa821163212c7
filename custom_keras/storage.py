"""The run-folder format: paths, atomic writes, snapshot history and safe reading.

This module imports no keras or tensorflow, so the Flask app and the Bokeh
server read run folders through it too. The storage folder (``VISUALIZER_STORAGE`` or
``<repo>/user_storage``) holds one folder per user, in it one folder per script
(``script_rel_dir``), which holds the script as uploaded and one folder per run::

    <storage>/<user_id>/<script stem>/          the script's folder, written by the server only
        <script>.py                             the script as uploaded
        runs/<run_id>/                          one run's folder (``run_rel_dir``, ``run_dir_in``)

A run's folder is the only one its script may write; a script stem never starts with
a dot and ``runs`` holds nothing but run ids, so no name a user chooses meets another's
folder. Layout of one run folder::

    <run>/
        <script>.py                    a copy of the script as it was when the run began
        output.txt                     stdout and stderr of the run
        status.json                    run state written by the web app's runner
        images/                        visualization input image(s)
        networks/<script>.keras        saved by NetworkSaver after every epoch (the newest)
        networks/epochs/<script>-epoch-<n>.keras  each epoch's, with keep_epochs=True
        results/
            training_progress.txt      "progress accuracy loss" (Appendix D)
            training_progress_val.txt  "epoch val_accuracy val_loss" (Appendix D)
            training_progress.tsv      header + every metric per batch, and running averages
            training_progress_val.tsv  header + every validation metric per epoch
            input_images.pickle        {image name: uint8 (H, W, C) as fed to the model}
            visualization_inputs.pickle  {input name: float32 array exactly as fed to the model}
            techniques.json            what the script registered and what became of it (below)
            <technique>.pickle         latest snapshot for the newest image (Appendix D)
            per_image/<image>/<technique>.pickle   latest snapshot for every image
            history/<technique>/index.jsonl        one JSON line of tags per snapshot, and a
                                                   {"removed": file} line per thinned one
            history/<technique>/<stage>.pickle     {"tags": {...}, "images": {image: result},
                                                    "info": {image: {...}}}
            alerts.jsonl               health-check alerts, one JSON object a line (below)
            gradient_norms.tsv         "step epoch batch <layer>...": gradient norm per layer
            dead_units.tsv             "step epoch batch <relu layer>...": fraction of dead units

``techniques.json`` is rewritten (atomically) at every register call, at train
begin and whenever a technique changes state: ``{key: entry}`` with the
registry's keys (plus ``"network_saver"``); a technique the script did not
register has no entry. Each entry::

    {"registered": true,
     "title": "saliency maps",
     "results_file": "saliency_maps.pickle",      # null for the network saver
     "params": {"interval": 10, ...},             # the register call's arguments, JSON-safe
     "interval": 10,                              # batches between snapshots; null if none
     "state": "registered" | "waiting" | "active" | "switched_off",
     "reason": null | "one line",                 # why waiting or switched off
     "first_snapshot_step": 0 | 1 | null,         # the batch (all epochs) of stage 0
     "input_kind": "image" | "sequence" | "tabular" | null}

"registered": the script registered it, training has not begun. "waiting": the
model is built by its first batch (a Sequential without keras.Input), so stage 0
comes after batch 1. "active": built, snapshots at ``first_snapshot_step`` and
every ``interval`` batches. "switched_off": it cannot handle this model or these
inputs (for example ``"needs an image: ..."``) or it failed at a snapshot;
training went on without it and ``reason`` says why.

Results of non-image inputs (``input_kind`` "sequence" (T, C) or "tabular" (F,)):
    layer_activations: as for images, plus ``uint8 (C, T)`` for layers with
        (T, C) outputs (one row per filter over time).
    saliency_maps: {"gradient": float32 like the input, "gradient_x_input":
        float32 like the input, "input": float32, and "feature_names": [str]
        when the script gave them}; the gradient is of the predicted class's
        pre-softmax score (or of the single output unit, before its sigmoid).
    deconvolutional_network: ``[(float32 (T, C) reconstruction, layer_name,
        feat_map_no), ...]`` (sequences only; tabular models have no feature maps).
    deep_visualization: ``[(float32 (T, C) or (F,) synthetic input, layer_name,
        unit_index, loss_value), ...]``.

Bounded history: each technique keeps at most ``history_limit`` snapshots
(``HISTORY_LIMIT`` by default): every recent one, and of the older ones stage 0
and an even spacing over the run (``stages_to_keep``). The index stays
append-only, so readers that read it by byte offset keep working: a thinned
snapshot gets a ``{"removed": "<file>"}`` line (appended before its file is
deleted) instead of a rewrite. ``read_history_index`` returns the entries still
kept among the lines it read; ``read_history_changes`` also returns the files
removed since ``offset``, for readers that keep earlier entries. A reader may
still meet an entry whose file was just thinned: ``read_snapshot`` then raises
FileNotFoundError, to be handled like any missing file (skip it or re-read the
index). The index grows by about 0.2 KB per snapshot ever taken, the snapshots
it points to stay bounded.

``alerts.jsonl`` (written by the health checks, append-only): one JSON object a
line with ``kind`` (one of ``custom_keras.techniques.health.ALERT_KINDS``),
``epoch`` (0-based), ``batch`` (batches done in that epoch), ``step`` (batches
done in all), ``message`` (the reason, plain words), ``advice`` (what to try),
``value`` (the number that raised it), ``time``, and ``layer`` for alerts about
one layer (dead_units). An alert is written when it appears and again only after
it has cleared, at most a few times an epoch.

The servers read a run folder as hostile input (the user's script writes it): through
``open_run_file`` and the readers built on it, which follow no link at any component,
read regular files only, never block and cap every read (the ``MAX_*_BYTES`` caps).

Pickles are replaced atomically (temporary file in the same folder, then
``os.replace``). Text tables and the history index are append-only: each row is
appended with a single ``write`` of a complete line, and readers ignore an
unterminated last line, so a reader never sees half a row, even after a kill.
"""
import errno
import io
import json
import os
import pickle
import re
import stat
import tempfile
import time

RESULTS_DIR = "results"
IMAGES_DIR = "images"
NETWORKS_DIR = "networks"
NETWORK_EPOCHS_DIR = "epochs"  # inside NETWORKS_DIR: one network per epoch (keep_epochs)
OUTPUT_FILE = "output.txt"
STATUS_FILE = "status.json"
INPUT_IMAGES_FILE = "input_images.pickle"
PER_IMAGE_DIR = "per_image"
HISTORY_DIR = "history"
HISTORY_INDEX = "index.jsonl"
RUN_DIR_ENV = "VISUALIZER_RUN_DIR"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# The training-progress tables (written by TrainingProgress, read by its dashboard).
TRAINING_PROGRESS_FILE = "training_progress.txt"
TRAINING_PROGRESS_VAL_FILE = "training_progress_val.txt"
TRAINING_PROGRESS_TABLE = "training_progress.tsv"
TRAINING_PROGRESS_VAL_TABLE = "training_progress_val.tsv"

# The run states of status.json, written by the web app's runner and by the run itself.
RUN_QUEUED, RUN_RUNNING = "queued", "running"
RUN_FINISHED, RUN_FAILED, RUN_STOPPED = "finished", "failed", "stopped"
RUN_ACTIVE_STATES = (RUN_QUEUED, RUN_RUNNING)
RUN_ENDED_STATES = (RUN_FINISHED, RUN_FAILED, RUN_STOPPED)

# The storage folder holds one folder per user, in it one folder per script and in that
# one folder per run: ``<storage>/<user_id>/<script stem>/runs/<run_id>``.
RUNS_DIR = "runs"
STORAGE_DIR_ENV = "VISUALIZER_STORAGE"
DEFAULT_STORAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "user_storage")


class UnsafePickleError(pickle.UnpicklingError):
    """A results file holds something other than numpy arrays and plain containers."""


def resolve_run_dir(file_folder):
    """The run folder for a script: ``VISUALIZER_RUN_DIR`` when set, else ``file_folder``.

    The folder is created if it does not exist, so a script also runs outside
    the web tool.
    """
    run_dir = os.environ.get(RUN_DIR_ENV) or file_folder
    if not run_dir:
        raise ValueError("file_folder must be a folder path, e.g. os.path.dirname(__file__)")
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def storage_dir_from_env(env=os.environ):
    """The storage folder: ``VISUALIZER_STORAGE`` when set, else ``<repo>/user_storage``."""
    return os.path.abspath(env.get(STORAGE_DIR_ENV) or DEFAULT_STORAGE_DIR)


def script_stem(script_file_name):
    """The run folder's name for a script, e.g. ``"mnist_digits"`` for ``"mnist_digits.py"``."""
    return os.path.splitext(script_file_name)[0]


def user_dir(storage_dir, user_id):
    """The folder of all of a user's scripts and runs: ``<storage>/<user_id>``."""
    return os.path.join(storage_dir, str(user_id))


def script_rel_dir(user_id, script_file_name):
    """A script's folder relative to the storage folder, e.g. ``"3/mnist_digits"``."""
    return "%d/%s" % (user_id, script_stem(script_file_name))


def run_rel_dir(user_id, script_file_name, run_id):
    """A run's folder relative to the storage folder, e.g. ``"3/mnist_digits/runs/17"``."""
    return "%s/%s/%d" % (script_rel_dir(user_id, script_file_name), RUNS_DIR, run_id)


def run_dir_in(storage_dir, rel_dir):
    """The folder of a ``run_rel_dir`` (or a ``script_rel_dir``) inside ``storage_dir``."""
    return os.path.join(storage_dir, *rel_dir.split("/"))


def check_run_rel_dir(user_id, rel_dir, error=ValueError):
    """Raises ``error`` unless ``rel_dir`` is ``<user_id>/<stem>/runs/<run_id>``: a run
    folder of one of the user's own scripts."""
    parts = rel_dir.split("/") if isinstance(rel_dir, str) else []
    if (len(parts) != 4 or parts[0] != str(user_id) or parts[1] in ("", ".", "..")
            or parts[2] != RUNS_DIR or not parts[3].isascii() or not parts[3].isdigit()
            or "\\" in rel_dir):
        raise error("run_rel_dir must be '<user_id>/<script>/%s/<run_id>' of user %r, got %r"
                    % (RUNS_DIR, user_id, rel_dir))


def results_dir(run_dir):
    return os.path.join(run_dir, RESULTS_DIR)


def results_path(run_dir, file_name):
    return os.path.join(run_dir, RESULTS_DIR, file_name)


def images_dir(run_dir):
    return os.path.join(run_dir, IMAGES_DIR)


def networks_dir(run_dir):
    return os.path.join(run_dir, NETWORKS_DIR)


def network_file(stem):
    """The network NetworkSaver keeps up to date, relative to the run folder."""
    return os.path.join(NETWORKS_DIR, stem + ".keras")


def network_epoch_file(stem, epoch):
    """The network as it was after ``epoch`` (counted from 1), kept with ``keep_epochs``."""
    return os.path.join(NETWORKS_DIR, NETWORK_EPOCHS_DIR, "%s-epoch-%d.keras" % (stem, epoch))


def list_network_epochs(run_dir, stem):
    """The epochs (ascending) whose networks the run kept; links and other files left out."""
    pattern = re.compile(r"%s-epoch-([1-9][0-9]{0,6})\.keras" % re.escape(stem))
    try:
        fd = _open_folder_fd(run_dir, [NETWORKS_DIR, NETWORK_EPOCHS_DIR])
    except (FileNotFoundError, UnsafeFileError):
        return []
    try:
        with os.scandir(fd) as entries:
            epochs = [int(match.group(1)) for match in (
                pattern.fullmatch(entry.name) for entry in entries
                if entry.is_file(follow_symlinks=False)) if match]
    finally:
        os.close(fd)
    return sorted(epochs)


def output_path(run_dir):
    return os.path.join(run_dir, OUTPUT_FILE)


def status_path(run_dir):
    return os.path.join(run_dir, STATUS_FILE)


def history_dir(run_dir, file_name):
    return os.path.join(run_dir, RESULTS_DIR, HISTORY_DIR, _stem(file_name))


def history_index_path(run_dir, file_name):
    return os.path.join(history_dir(run_dir, file_name), HISTORY_INDEX)


def per_image_path(run_dir, image_name, file_name):
    return os.path.join(run_dir, RESULTS_DIR, PER_IMAGE_DIR, image_name, file_name)


def _stem(file_name):
    return os.path.splitext(file_name)[0]


# --- writing -----------------------------------------------------------------

def atomic_write_bytes(path, data):
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_pickle(path, obj):
    atomic_write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def atomic_write_json(path, obj):
    atomic_write_bytes(path, json.dumps(obj).encode("utf-8"))


def append_line(path, line):
    """Append one complete line with a single write, so readers never see half a row."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def append_lines(path, lines):
    """Append complete lines with a single write, so readers never see half a row."""
    if lines:
        append_line(path, "\n".join(line.rstrip("\n") for line in lines))


def append_row(path, columns, values):
    """Append a tab-separated row to a table file, writing the header line first if new."""
    append_rows(path, columns, [values])


def append_rows(path, columns, rows):
    """Append tab-separated rows to a table file in one write, the header line first if new."""
    lines = ["\t".join(_format_value(v) for v in values) for values in rows]
    if lines and not os.path.exists(path):
        lines.insert(0, "\t".join(columns))
    append_lines(path, lines)


def _format_value(value):
    return repr(float(value)) if isinstance(value, float) else str(value)


def write_input_images(run_dir, images_by_name):
    """Store the images as fed to the model: {image name: uint8 (H, W, C)}."""
    atomic_write_pickle(results_path(run_dir, INPUT_IMAGES_FILE), dict(images_by_name))


def write_snapshot(run_dir, file_name, results_by_image, newest_image, tags, info_by_image=None):
    """Write one snapshot of a technique.

    Args:
        run_dir: the run folder.
        file_name: the technique's results file, e.g. ``"saliency_maps.pickle"``.
        results_by_image: {image name: result in the technique's Appendix D format}.
        newest_image: the image whose result becomes ``results/<file_name>``.
        tags: {"stage", "epoch", "batch", "step"}; "time" is added.
        info_by_image: optional {image name: small dict} shown beside the result
            (for example the predicted class and its confidence).

    The history file is written first and the index line last, so an index
    entry always points to a complete file.
    """
    info_by_image = info_by_image or {}
    tags = dict(tags, time=time.time())
    folder = history_dir(run_dir, file_name)
    snapshot_file = snapshot_file_name(tags["stage"])
    atomic_write_pickle(os.path.join(folder, snapshot_file),
                        {"tags": tags, "images": results_by_image, "info": info_by_image})
    for image_name, result in results_by_image.items():
        atomic_write_pickle(per_image_path(run_dir, image_name, file_name), result)
    atomic_write_pickle(results_path(run_dir, file_name), results_by_image[newest_image])
    append_line(os.path.join(folder, HISTORY_INDEX), json.dumps(dict(tags, file=snapshot_file)))


def write_run_status(run_dir, state, exit_code=None, message=None):
    atomic_write_json(status_path(run_dir), {"state": state, "exit_code": exit_code,
                                             "message": message, "time": time.time()})


VISUALIZATION_INPUTS_FILE = "visualization_inputs.pickle"
TECHNIQUES_FILE = "techniques.json"
# The states of a technique in techniques.json (see the module docstring).
TECHNIQUE_REGISTERED = "registered"
TECHNIQUE_WAITING = "waiting"
TECHNIQUE_ACTIVE = "active"
TECHNIQUE_SWITCHED_OFF = "switched_off"
TECHNIQUE_STATES = (TECHNIQUE_REGISTERED, TECHNIQUE_WAITING, TECHNIQUE_ACTIVE,
                    TECHNIQUE_SWITCHED_OFF)


def write_visualization_inputs(run_dir, inputs_by_name):
    """Store the visualization inputs exactly as fed to the model: {name: float32 array}."""
    atomic_write_pickle(results_path(run_dir, VISUALIZATION_INPUTS_FILE), dict(inputs_by_name))


def write_techniques(run_dir, entries):
    """Replace ``results/techniques.json`` with {key: entry} (format in the module docstring)."""
    atomic_write_json(results_path(run_dir, TECHNIQUES_FILE), entries)


ALERTS_FILE = "alerts.jsonl"
GRADIENT_NORMS_TABLE = "gradient_norms.tsv"
DEAD_UNITS_TABLE = "dead_units.tsv"
# Snapshots kept per technique unless CustomCallbacks is given another history_limit.
HISTORY_LIMIT = 300


def write_alert(run_dir, alert):
    """Append one alert (a JSON-safe dict, format in the module docstring) to ``alerts.jsonl``."""
    append_line(results_path(run_dir, ALERTS_FILE), json.dumps(alert))


def stages_to_keep(stages, limit):
    """The snapshot stages a bounded history keeps, from the ``stages`` it holds (ascending).

    The newest ``limit - limit // 2`` stages are all kept; of the older ones, those
    that are multiples of the smallest power of two with at most ``limit // 2``
    multiples up to the newest older stage: stage 0, then an even spacing over
    the run. The spacing only ever doubles, so a stage thinned out is never
    wanted back, and thinning is the same whoever computes it.
    """
    if limit < 2:
        raise ValueError("history_limit must be at least 2 (stage 0 and the latest), got %r"
                         % (limit,))
    stages = list(stages)
    recent_count = limit - limit // 2
    older, recent = stages[:-recent_count], stages[-recent_count:]
    # from the stage numbers, not from what is left: thinning twice changes nothing
    spacing = 1
    while older and older[-1] // spacing + 1 > limit // 2:
        spacing *= 2
    return [stage for stage in older if stage % spacing == 0] + recent


def snapshot_file_name(stage):
    return "%09d.pickle" % int(stage)


def thin_history(run_dir, file_name, stages, limit):
    """Thin a technique's history to ``limit`` snapshots; returns the stages kept.

    For each snapshot thinned out a removal line ``{"removed": "<file>"}`` is
    appended to the index first and the file is deleted after, so a kill between
    the two leaves a stray file, never an index entry without its file.
    """
    kept = stages_to_keep(stages, limit)
    removed = sorted(set(stages) - set(kept))
    if removed:
        folder = history_dir(run_dir, file_name)
        append_lines(os.path.join(folder, HISTORY_INDEX),
                     [json.dumps({"removed": snapshot_file_name(stage)}) for stage in removed])
        for stage in removed:
            try:
                os.remove(os.path.join(folder, snapshot_file_name(stage)))
            except FileNotFoundError:
                pass
    return kept


# --- reading -----------------------------------------------------------------


# --- reading a run folder: hostile input ---------------------------------------
#
# A run folder is written by the user's script, so the servers read it as hostile
# input: no link is followed at any component of a path, only regular files are read
# (a named pipe or a device never blocks a page), and every read is capped.

KIB = 1024
MIB = 1024 * KIB
MAX_RESULT_BYTES = 32 * MIB          # one results pickle or history snapshot
MAX_INPUT_IMAGES_BYTES = 32 * MIB    # results/input_images.pickle
MAX_STATUS_BYTES = 64 * KIB          # status.json
MAX_LINES_BYTES = 1 * MIB            # one call of read_complete_lines (tables, history index)
MAX_IMAGE_BYTES = 32 * MIB           # one file of images/, served by the image route
MAX_SCRIPT_BYTES = 2 * MIB           # the script shown in the Overview tab
MAX_TAIL_BYTES = 256 * KIB           # the end of output.txt shown live
MAX_DOWNLOAD_BYTES = 2048 * MIB      # output.txt or the network, streamed as a download
MAX_LINE_COUNT_BYTES = 64 * MIB      # of output.txt read to count lines (a traceback's line)

_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeFileError(OSError):
    """A path in a run folder is a link, leaves the folder or is not a regular file or folder."""


class FileTooLargeError(UnsafeFileError):
    """A file in a run folder is larger than the servers read."""


class RunFile(io.RawIOBase):
    """A regular file of a run folder, opened without following links (``open_run_file``).

    ``size`` is its size when it was opened; no read goes past it, so a file that
    a run keeps growing costs no more than it did then. Read it as a stream
    (``read``, or wrapped in ``io.BufferedReader``) or at an offset (``read_at``).
    Use it as a context manager, or call ``close``.
    """

    def __init__(self, fd, size, name):
        super().__init__()
        self.fd, self.size, self.name, self._position = fd, size, name, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self.read_at(self._position, len(buffer))
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)

    def read_at(self, offset=0, count=None):
        """Up to ``count`` bytes from byte ``offset`` (all up to ``size`` when None)."""
        end = self.size if count is None else min(self.size, offset + count)
        chunks = []
        while offset < end:
            chunk = os.pread(self.fd, end - offset, offset)
            if not chunk:  # the file shrank since it was opened
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        super().close()


def _parts_inside(run_dir, path):
    """The components of ``path`` below ``run_dir``; ``path`` is absolute or relative to it."""
    relative = os.path.relpath(path, run_dir) if os.path.isabs(path) else path
    parts = relative.split(os.sep)
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafeFileError("%s is not a path inside the run folder" % relative)
    return parts


def _open_folder_fd(run_dir, folder_parts):
    """A descriptor of the folder ``run_dir/folder_parts``, opened without following links.

    The run folder itself must not be a link either; the folders above it belong
    to the server.
    """
    run_dir = os.path.normpath(os.path.abspath(run_dir))
    fd = _open_folder_step(os.path.dirname(run_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [os.path.basename(run_dir)] + list(folder_parts):
            child = _open_folder_step(part, _FOLDER_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_folder_step(path, flags, dir_fd=None):
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFileError("%s is a link or not a folder" % os.path.basename(path)) \
                from None
        raise


def open_run_file(run_dir, path, max_bytes):
    """Opens a regular file of a run folder without following a link at any component.

    Never blocks: a named pipe is opened non-blocking and refused before anything
    is read.

    Args:
        run_dir: the run folder.
        path: the file, absolute inside ``run_dir`` or relative to it.
        max_bytes: the largest size accepted.

    Returns:
        an open ``RunFile``.

    Raises:
        FileNotFoundError: the file or a folder on its way does not exist.
        UnsafeFileError: a component is a link, or the file is not a regular file.
        FileTooLargeError: the file is larger than ``max_bytes``.
    """
    parts = _parts_inside(run_dir, path)
    folder_fd = _open_folder_fd(run_dir, parts[:-1])
    try:
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=folder_fd)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UnsafeFileError("%s is a link" % parts[-1]) from None
            raise
    finally:
        os.close(folder_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError("%s is not a regular file" % parts[-1])
        if info.st_size > max_bytes:
            raise FileTooLargeError("%s is larger than %s" % (
                parts[-1], format_bytes(max_bytes)))
    except BaseException:
        os.close(fd)
        raise
    return RunFile(fd, info.st_size, parts[-1])


def read_run_file(run_dir, path, max_bytes):
    """The bytes of a regular file of a run folder; raises like ``open_run_file``."""
    with open_run_file(run_dir, path, max_bytes) as run_file:
        return run_file.read_at()


def is_run_file(run_dir, path):
    """True when ``path`` is a regular file of the run folder, reached without links."""
    try:
        open_run_file(run_dir, path, float("inf")).close()
    except (FileNotFoundError, UnsafeFileError):
        return False
    return True


def format_bytes(count):
    """E.g. "64 MB" or "512 KB" (binary units, as the caps are defined)."""
    if count >= MIB:
        return "%g MB" % round(count / MIB, 1)
    return "%g KB" % round(count / KIB, 1)


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows numpy arrays, numpy scalars/dtypes and plain Python containers only."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "list"), ("builtins", "tuple"), ("builtins", "dict"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "str"), ("builtins", "bytes"),
        ("builtins", "int"), ("builtins", "float"), ("builtins", "complex"), ("builtins", "bool"),
        ("collections", "OrderedDict"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        # numpy scalar and dtype classes, e.g. numpy.dtypes.UInt8DType or numpy.float32
        if module in ("numpy", "numpy.dtypes") and (name.endswith("DType") or _is_numpy_scalar(name)):
            return super().find_class(module, name)
        raise UnsafePickleError(
            "refused to load %s.%s: results files may hold only numpy arrays and plain containers"
            % (module, name))


def _is_numpy_scalar(name):
    import numpy
    cls = getattr(numpy, name, None)
    return isinstance(cls, type) and issubclass(cls, numpy.generic)


def safe_loads(data):
    """Unpickle bytes with the restricted unpickler; raises UnsafePickleError."""
    return _restricted_load(io.BytesIO(data))


def safe_load(run_dir, path, max_bytes=MAX_RESULT_BYTES):
    """Unpickles a results file of a run folder with the restricted unpickler.

    Raises:
        FileNotFoundError, UnsafeFileError, FileTooLargeError: as ``open_run_file``.
        UnsafePickleError: the file holds something other than arrays and containers.
        pickle.UnpicklingError: the file is not a complete, well-formed pickle.
    """
    with open_run_file(run_dir, path, max_bytes) as run_file:
        # unpickled from the file, not from a copy of its bytes: arrays take their size once
        return _restricted_load(io.BufferedReader(run_file))


def _restricted_load(file):
    try:
        return _RestrictedUnpickler(file).load()
    except (pickle.UnpicklingError, OSError):
        raise
    except Exception as error:  # crafted arguments make allowed callables raise anything
        raise pickle.UnpicklingError("not a well-formed results pickle: %s: %s"
                                     % (type(error).__name__, error)) from None


def read_latest(run_dir, file_name, image_name=None):
    """The latest result of a technique (for ``image_name``, else the newest image), or None."""
    path = (per_image_path(run_dir, image_name, file_name) if image_name
            else results_path(run_dir, file_name))
    try:
        return safe_load(run_dir, path)
    except FileNotFoundError:
        return None


def read_input_images(run_dir):
    try:
        return safe_load(run_dir, results_path(run_dir, INPUT_IMAGES_FILE), MAX_INPUT_IMAGES_BYTES)
    except FileNotFoundError:
        return {}


def read_visualization_inputs(run_dir):
    """{input name: float32 array as fed to the model}, or {} before the run wrote them."""
    try:
        return safe_load(run_dir, results_path(run_dir, VISUALIZATION_INPUTS_FILE),
                         MAX_INPUT_IMAGES_BYTES)
    except FileNotFoundError:
        return {}


def read_complete_lines(run_dir, path, offset=0, max_bytes=MAX_LINES_BYTES):
    """Complete lines of a file of a run folder from byte ``offset``: (lines, new offset).

    An unterminated last line (a row being written) is left for the next call.
    One call reads at most ``max_bytes``; the next call goes on from there, so a
    huge file is read in steps, never whole.

    Raises:
        UnsafeFileError: the file is a link or not a regular file.
        FileTooLargeError: ``max_bytes`` from ``offset`` hold no line end.
    """
    try:
        run_file = open_run_file(run_dir, path, float("inf"))
    except FileNotFoundError:
        return [], offset
    with run_file:
        data = run_file.read_at(offset, max_bytes)
    end = data.rfind(b"\n") + 1
    if not end and len(data) == max_bytes:
        raise FileTooLargeError("%s has a line longer than %s" % (
            run_file.name, format_bytes(max_bytes)))
    lines = data[:end].decode("utf-8", errors="replace").splitlines()
    return lines, offset + end


def read_table(run_dir, path, offset=0):
    """New rows of a tab-separated table written by ``append_row``.

    Returns (columns, rows, new offset); rows are lists of floats. Call first
    with offset 0 (which also returns the header), then with the returned offset.
    """
    lines, new_offset = read_complete_lines(run_dir, path, offset)
    columns = None
    if offset == 0 and lines:
        columns, lines = lines[0].split("\t"), lines[1:]
    rows = [[float(v) for v in line.split("\t")] for line in lines if line]
    return columns, rows, new_offset


MAX_ALERTS_BYTES = 256 * KIB   # of results/alerts.jsonl read for the pages and dashboards
ALERT_FIELDS = ("kind", "epoch", "batch", "step", "message", "advice", "value", "time", "layer")


def read_alerts(run_dir, max_bytes=MAX_ALERTS_BYTES):
    """The run's alerts, oldest first, and a sentence about what could not be read, or "".

    At most ``max_bytes`` of ``alerts.jsonl`` are read; a malformed line (not a JSON
    object with a text ``kind``) is skipped and counted. Each alert keeps only
    ``ALERT_FIELDS``; "kind", "message" and "advice" are always texts.
    """
    path = results_path(run_dir, ALERTS_FILE)
    try:
        lines, end = read_complete_lines(run_dir, path, 0, max_bytes)
    except OSError as error:  # a link, a named pipe, one huge line
        return [], "The alerts could not be read: %s." % error
    alerts, bad_lines = [], 0
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("kind"), str)):
            bad_lines += 1
            continue
        alert = {name: record.get(name) for name in ALERT_FIELDS}
        for name in ("kind", "message", "advice"):
            alert[name] = "" if alert[name] is None else str(alert[name])
        alerts.append(alert)
    problems = []
    if bad_lines:
        problems.append("%d malformed line(s) of %s were skipped." % (bad_lines, ALERTS_FILE))
    if file_size(path) > end:
        problems.append("Only the first %s of %s were read." % (format_bytes(end), ALERTS_FILE))
    return alerts, " ".join(problems)


def read_last_row(run_dir, path):
    """{column: float} of the last complete row of a table (``append_row``), or None.

    Reads the header and at most ``MAX_LINES_BYTES`` at the end, however long the table.

    Raises:
        OSError: the table is a link or not a regular file, or has a huge line.
    """
    lines, _ = read_complete_lines(run_dir, path, 0)
    if not lines:
        return None
    columns = lines[0].split("\t")
    tail, _ = read_complete_lines(run_dir, path, max(0, file_size(path) - MAX_LINES_BYTES))
    for line in reversed(tail[1:] if len(tail) > 1 else lines[1:]):
        try:
            values = [float(v) for v in line.split("\t")]
        except ValueError:
            continue
        if len(values) == len(columns):
            return dict(zip(columns, values))
    return None


# Columns of the training-progress tables that say where a row is, not how training went.
POSITION_COLUMNS = ("progress", "epoch", "batch")


def read_final_metrics(run_dir):
    """{metric: value} of a run's last training row and last validation row, or None.

    Positions and running averages (``*_avg``) are left out; NaN and Inf stay as they were.

    Raises:
        OSError, ValueError: a table is a link or not a regular file, or has a huge line.
    """
    final = {}
    for table in (TRAINING_PROGRESS_TABLE, TRAINING_PROGRESS_VAL_TABLE):
        last = read_last_row(run_dir, results_path(run_dir, table))
        final.update({name: value for name, value in (last or {}).items()
                      if name not in POSITION_COLUMNS and not name.endswith("_avg")})
    return final or None


def read_history_index(run_dir, file_name, offset=0):
    """Tags of the snapshots written since byte ``offset`` and still kept: (list of dicts,
    new offset). Read from 0, these are the snapshots of the bounded history."""
    entries, _, new_offset = read_history_changes(run_dir, file_name, offset)
    return entries, new_offset


def read_history_changes(run_dir, file_name, offset=0):
    """What the history index says since byte ``offset``: (entries added and still kept,
    set of files removed, new offset). A reader that keeps the entries of earlier calls
    drops those whose ``file`` is in the removed set."""
    lines, new_offset = read_complete_lines(
        run_dir, os.path.join(history_dir(run_dir, file_name), HISTORY_INDEX), offset)
    try:
        records = [json.loads(line) for line in lines if line]
    except RecursionError:  # a line of thousands of nested brackets
        raise ValueError("%s has a line nested too deeply" % HISTORY_INDEX) from None
    removed = {record["removed"] for record in records
               if isinstance(record, dict) and isinstance(record.get("removed"), str)}
    entries = [record for record in records if not (
        isinstance(record, dict) and ("removed" in record or record.get("file") in removed))]
    return entries, removed, new_offset


def read_snapshot(run_dir, file_name, entry):
    """The snapshot an index entry points to: {"tags", "images", "info"}.

    Raises FileNotFoundError when the snapshot was thinned out of the bounded
    history after the index was read (see the module docstring)."""
    return safe_load(run_dir, snapshot_path(run_dir, file_name, entry))


def snapshot_path(run_dir, file_name, entry):
    """The history file of an index entry; its ``file`` tag cannot name another folder."""
    return os.path.join(history_dir(run_dir, file_name), os.path.basename(str(entry["file"])))


def read_run_status(run_dir):
    """The run state written by ``write_run_status``, or None when missing or unreadable."""
    try:
        status = json.loads(read_run_file(run_dir, STATUS_FILE, MAX_STATUS_BYTES))
    except (FileNotFoundError, UnsafeFileError, ValueError):
        return None
    return status if isinstance(status, dict) else None


MAX_TECHNIQUES_BYTES = 256 * KIB   # results/techniques.json


def read_techniques(run_dir):
    """{key: entry} of ``results/techniques.json`` (entries that are dicts), or None.

    None means the script has registered nothing yet (or the file is missing,
    unreadable or not a JSON object); a technique missing from a dict was not
    registered.
    """
    try:
        entries = json.loads(read_run_file(run_dir, results_path(run_dir, TECHNIQUES_FILE),
                                           MAX_TECHNIQUES_BYTES))
    except (FileNotFoundError, UnsafeFileError, ValueError, RecursionError):
        return None
    if not isinstance(entries, dict):
        return None
    return {key: entry for key, entry in entries.items() if isinstance(entry, dict)}


TRACEBACK_START = "Traceback (most recent call last):"


def read_failure(run_dir):
    """Where the last Python traceback of ``output.txt`` starts and the exception it ends with.

    Only the end of the output is searched (``MAX_TAIL_BYTES``), where a run that
    failed printed its traceback; lines are counted up to there only within
    ``MAX_LINE_COUNT_BYTES``.

    Returns:
        (line number counted from 1 in the whole output, or None when the output
        is too long to count, the exception's last line, e.g. "ValueError: bad
        shape"), or None when the end of the output holds no traceback.
    """
    try:
        with open_run_file(run_dir, OUTPUT_FILE, float("inf")) as run_file:
            start = max(0, run_file.size - MAX_TAIL_BYTES)
            tail = run_file.read_at(start)
            lines_before = (_count_newlines(run_file, start) if start <= MAX_LINE_COUNT_BYTES
                            else None)
    except (FileNotFoundError, UnsafeFileError):
        return None
    lines = tail.decode("utf-8", errors="replace").split("\n")
    starts = [i for i, line in enumerate(lines) if line.rstrip("\r").endswith(TRACEBACK_START)]
    if not starts:
        return None
    # the frames are indented; the first unindented line after them names the exception
    exception = next((line.strip() for line in lines[starts[-1] + 1:]
                      if line.strip() and not line.startswith((" ", "\t"))), "")
    return (None if lines_before is None else lines_before + starts[-1] + 1), exception


def _count_newlines(run_file, end, chunk=MIB):
    count = 0
    for offset in range(0, end, chunk):
        count += run_file.read_at(offset, min(chunk, end - offset)).count(b"\n")
    return count


def list_images(run_dir):
    """Visualization images in ``images/``, oldest first (the last one is the newest).

    Links and anything but regular files are left out.
    """
    try:
        fd = _open_folder_fd(run_dir, [IMAGES_DIR])
    except (FileNotFoundError, UnsafeFileError):  # no folder, a link, or a file where one should be
        return []
    try:
        with os.scandir(fd) as entries:
            found = [(entry.stat(follow_symlinks=False).st_mtime_ns, entry.name)
                     for entry in entries
                     if entry.name.lower().endswith(IMAGE_EXTENSIONS)
                     and not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)]
    finally:
        os.close(fd)
    return [name for _, name in sorted(found)]


def file_mtime(path):
    """Modification time in ns (of a link itself, never its target), or None.

    Dashboards use it to reload only changed files.
    """
    try:
        return os.lstat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def file_size(path):
    """Size in bytes (of a link itself, never its target); 0 when missing."""
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return 0


def disk_usage(path):
    """Bytes that ``path`` takes (a file, or a folder with everything below it); 0 when missing.

    Walked with lstat, never following a link. A file counts with the larger of
    its size and its allocated blocks (a sparse file counts at its full size), a
    hard-linked file once.
    """
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    if not stat.S_ISDIR(info.st_mode):
        return _bytes_taken(info)
    total, seen, pending = 0, set(), [path]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                pending.append(entry.path)
            elif info.st_nlink > 1:
                if (info.st_dev, info.st_ino) in seen:
                    continue
                seen.add((info.st_dev, info.st_ino))
            total += _bytes_taken(info)
    return total


def _bytes_taken(info):
    return max(info.st_size, info.st_blocks * 512)


# --- explorations (an uploaded model analysed by a job: custom_keras.explore) -----------
#
#   <storage>/<user_id>/explore@<id>/
#       explore.py                   the job's script (written by the server at every start)
#       model.keras                  the model to explore
#       images/ | inputs.npy         the inputs: image files, or one array of samples
#       class_names.json             optional: a list of names, one per output unit
#       explore_settings.json        {"idle_s": seconds idle before the job exits}
#       requests/<id>.json           requests of the server (written atomically, never changed)
#       results/explore_ready.json   {"notices": [str], "images": [{"name", "png"}]}: analysed
#       results/explore_failure.json {"message": str}: why the job could not explore the model
#       results/architecture.json, results/predictions.json
#       results/layers/<layer_file_name(node, image)>   one layer's activations for one image
#       results/compute/<request id>.json (+ its PNGs)   a compute request's response
#
# '@' is never in a script stem (uploads are sanitised to [A-Za-z0-9_.-]), so no script's
# run folder can be an exploration's.
EXPLORE_FOLDER_PREFIX = "explore@"
EXPLORE_SCRIPT_FILE = "explore.py"
EXPLORE_MODEL_FILE = "model.keras"
EXPLORE_INPUTS_FILE = "inputs.npy"
EXPLORE_CLASS_NAMES_FILE = "class_names.json"
EXPLORE_SETTINGS_FILE = "explore_settings.json"
EXPLORE_REQUESTS_DIR = "requests"
EXPLORE_READY_FILE = "explore_ready.json"
EXPLORE_FAILURE_FILE = "explore_failure.json"
EXPLORE_ARCHITECTURE_FILE = "architecture.json"
EXPLORE_PREDICTIONS_FILE = "predictions.json"
EXPLORE_LAYERS_DIR = "layers"
EXPLORE_COMPUTE_DIR = "compute"
EXPLORE_INPUT_PNG_DIR = "inputs"
MAX_EXPLORE_JSON_BYTES = 64 * MIB    # one JSON file the job wrote (a layer's maps, the graph)
MAX_REQUEST_BYTES = 64 * KIB


def exploration_rel_dir(user_id, exploration_id):
    """An exploration's folder relative to the storage folder, e.g. ``"3/explore@12"``."""
    return "%d/%s%d" % (user_id, EXPLORE_FOLDER_PREFIX, exploration_id)


def layer_file_name(node_id, image_name):
    """The file of one layer's activations for one image in ``results/layers/``.

    A hash: node ids hold '/' (nested models) and image names are the user's.
    """
    import hashlib
    key = hashlib.sha256(("%s\0%s" % (node_id, image_name)).encode("utf-8")).hexdigest()
    return key[:40] + ".json"


def layer_path(run_dir, node_id, image_name):
    return results_path(run_dir, os.path.join(EXPLORE_LAYERS_DIR, layer_file_name(
        node_id, image_name)))


def compute_path(run_dir, file_name):
    return results_path(run_dir, os.path.join(EXPLORE_COMPUTE_DIR, file_name))


def write_request(run_dir, request_id, request):
    """Writes a request of the server into ``requests/`` of a folder a job controls.

    No link is followed (the folder and ``requests/`` are opened with O_NOFOLLOW), the
    file is created new (O_EXCL) and renamed into place, so a reader sees all of it.

    Args:
        run_dir: the exploration's folder.
        request_id: a name of letters, digits, '-' and '_'.
        request: a JSON-serialisable dict.

    Raises:
        UnsafeFileError: ``requests`` is a link or not a folder.
        OSError: it could not be written.
    """
    try:
        os.mkdir(os.path.join(run_dir, EXPLORE_REQUESTS_DIR), 0o755)
    except FileExistsError:
        pass
    fd = _open_folder_fd(run_dir, [EXPLORE_REQUESTS_DIR])
    temporary = ".tmp-%s.json" % request_id
    try:
        file_fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o644, dir_fd=fd)
        with os.fdopen(file_fd, "wb") as f:
            f.write(json.dumps(request).encode("utf-8"))
        os.rename(temporary, request_id + ".json", src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


def read_json(run_dir, path, max_bytes=MAX_EXPLORE_JSON_BYTES):
    """A JSON file of a folder a job controls, read like ``read_run_file``.

    Raises:
        FileNotFoundError, UnsafeFileError, FileTooLargeError: as ``open_run_file``.
        ValueError: the file is not JSON.
    """
    try:
        return json.loads(read_run_file(run_dir, path, max_bytes))
    except RecursionError:
        raise ValueError("%s is nested too deeply" % os.path.basename(path)) from None


def remove_run_file(run_dir, path):
    """Removes a file (or a link: never what it points to) of a run folder, if it is there.

    The folders on the way are opened without following links.
    """
    parts = _parts_inside(run_dir, path)
    try:
        fd = _open_folder_fd(run_dir, parts[:-1])
    except (FileNotFoundError, UnsafeFileError):
        return
    try:
        os.unlink(parts[-1], dir_fd=fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
