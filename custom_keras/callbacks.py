"""Keras callbacks that write training visualizations into the run folder.

Usage (the thesis' Appendix C API)::

    from custom_keras.callbacks import CustomCallbacks
    callbacks = CustomCallbacks(os.path.dirname(__file__), base_interval=10)
    callbacks.register_network_saver()
    callbacks.register_training_progress()     # and the health checks (alerts)
    callbacks.register_layer_activations()
    callbacks.register_saliency_maps()
    callbacks.register_deconvolutional_network(3, feat_map_amount=8)
    callbacks.register_deep_visualization([(9, 0), (9, 1)], 200, 50, l2_decay=0.0001,
                                          blur_interval=4, blur_std=1.0)
    callbacks.register_grad_cam()               # and every other technique the registry
    callbacks.register_lrp(rule="z_plus")      # declares: register_<key>(...)
    model.fit(x, y, callbacks=callbacks.get_list())

The callbacks hold the schedule and the file output only; the techniques are
pure functions in ``custom_keras.techniques`` and the file format is
``custom_keras.storage``. Results go to ``VISUALIZER_RUN_DIR`` when set (the web
tool sets it), else to the folder given.

Schedule: every visualization runs once before the first batch (stage 0) and
then after every ``interval`` batches, counting batches across epochs. Each
snapshot is tagged with ``stage``, ``epoch`` (0-based, as Keras counts),
``batch`` (batches done in that epoch), ``step`` (batches done in all),
``progress`` (``step`` in epochs, the training-progress x axis) and ``time``.

Failure isolation: arguments that are wrong whatever the model (an interval of
0, a negative learning rate, feat_map_amount together with feat_map_nos) raise
a ValueError or TypeError naming the argument at registration. Everything that
depends on the model or the inputs (a layer number out of range, a layer the
deconvolutional network cannot reverse, a model without image input and no
``visualization_inputs``) switches that technique off for this run instead: one
line on stderr, the reason in ``results/techniques.json`` (see
``custom_keras.storage``), and the training and the other techniques go on. So
does a technique that fails at any snapshot. The techniques are built when
training begins, or right after the first batch for a model that Keras builds
then (a Sequential without keras.Input); stage 0 is taken at that moment.
"""
import atexit
import glob
import inspect
import math
import os
import shutil
import sys
import tempfile
import time
import weakref

import keras
import numpy as np

from custom_keras import images as visualization_images
from custom_keras import registry, storage
from custom_keras.inputs import (NotApplicable, check_inputs_array, input_kind, input_names,
                                 prepare_inputs)
from custom_keras.storage import (TRAINING_PROGRESS_FILE, TRAINING_PROGRESS_TABLE,
                                  TRAINING_PROGRESS_VAL_FILE, TRAINING_PROGRESS_VAL_TABLE)
from custom_keras.techniques.activations import (EXCLUDE_LAYERS, ActivationModel,
                                                 check_exclude_layers)
from custom_keras.techniques.attribution import graph as attribution_graph
from custom_keras.techniques.common import scale_by_max, softmax, to_uint8
from custom_keras.techniques.deconvolution import (DeconvolutionModel,
                                                   check_deconvolution_selection)
from custom_keras.techniques import health
from custom_keras.techniques.deep_visualization import (DeepVisualizationModel, check_regularizers,
                                                        check_unit_list)
from custom_keras.techniques.saliency import SaliencyModel

# Deep visualization does not use the visualization images; with none in the
# folder its results are stored under this name.
NO_IMAGE = "no_image"


def _check_interval(interval, argument="interval"):
    if not isinstance(interval, (int, np.integer)) or isinstance(interval, bool) or interval < 1:
        raise ValueError("%s must be a whole number of batches >= 1, got %r" % (argument, interval))
    return int(interval)


def _check_history_limit(history_limit):
    if not isinstance(history_limit, (int, np.integer)) or isinstance(history_limit, bool) \
            or history_limit < 2:
        raise ValueError("history_limit must be a whole number of snapshots >= 2 (stage 0 and "
                         "the latest are always kept), got %r" % (history_limit,))
    return int(history_limit)


def _check_function(function, argument):
    if function is not None and not callable(function):
        raise TypeError("%s must be a function or None, got %r" % (argument, function))
    return function


def _one_line(error):
    return "%s: %s" % (type(error).__name__, " ".join(str(error).split()))


def _remove_files(paths):
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _flush_at_exit(callback_ref):
    callback = callback_ref()
    if callback is not None:
        try:
            callback._flush()
        except Exception as error:  # at exit: report, never raise
            print("[visualizer] training progress: last rows not written: %s" % _one_line(error),
                  file=sys.stderr, flush=True)


def script_name():
    """The running script's file name without ``.py``, or ``"model"`` when there is none."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or (sys.argv[0] if sys.argv else "")
    name = os.path.splitext(os.path.basename(main_file))[0]
    return name if name and name != "__main__" and not name.startswith("-") else "model"


class NetworkSaver(keras.callbacks.Callback):
    """Saves the model to ``networks/<script>.keras`` after every epoch.

    The file is replaced atomically, so a download never gets half a network. With
    ``keep_epochs`` each epoch's network is also kept, as
    ``networks/epochs/<script>-epoch-<n>.keras`` (a hard link to the same bytes where
    the file system allows), so any epoch can be explored later.

    Args:
        file_folder: should always be ``os.path.dirname(__file__)``.
        record: the run's ``TechniqueRecord``.
        keep_epochs: keep every epoch's network, not only the newest.
    """

    key = "network_saver"

    def __init__(self, file_folder, record=None, keep_epochs=False):
        super().__init__()
        self.run_dir = storage.resolve_run_dir(file_folder)
        self.stem = script_name()
        self.path = os.path.join(self.run_dir, storage.network_file(self.stem))
        self.keep_epochs = bool(keep_epochs)
        self.record = record or TechniqueRecord.shared(self.run_dir)
        self.record.register(self.key, "network saver", None,
                             {"keep_epochs": self.keep_epochs}, None)

    def on_train_begin(self, logs=None):
        self.record.update(self.key, state=storage.TECHNIQUE_ACTIVE)

    def on_epoch_end(self, epoch, logs=None):
        tmp = None
        try:
            folder = os.path.dirname(self.path)
            os.makedirs(folder, exist_ok=True)
            # Keras insists on the .keras suffix, so the temporary name keeps it.
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".keras")
            os.close(fd)
            self.model.save(tmp, overwrite=True)
            if self.keep_epochs:
                self._keep(tmp, epoch + 1)
            os.replace(tmp, self.path)
        except Exception as error:  # saving must never stop the training
            print("[visualizer] network saver failed at epoch %d: %s" % (epoch + 1, _one_line(error)),
                  file=sys.stderr, flush=True)
        finally:
            if tmp:
                _remove_files([tmp])

    def _keep(self, saved, epoch):
        kept = os.path.join(self.run_dir, storage.network_epoch_file(self.stem, epoch))
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        _remove_files([kept])  # a second fit of the same script counts epochs from 1 again
        try:
            os.link(saved, kept)
        except OSError:  # a file system without hard links: a copy
            shutil.copyfile(saved, kept)


class TrainingProgress(keras.callbacks.Callback):
    """Saves loss and every metric for each batch, and the validation values after each epoch.

    Keras hands callbacks the running average over the epoch so far; this
    callback derives each batch's own value from it, weighting batches by their
    number of samples (read from the model's loss tracker), so a smaller last
    batch is handled exactly. The derivation is exact for metrics that are
    means over samples (loss, accuracy, mae, ...); for metrics that are not
    (AUC, precision) a batch's value is only an estimate, and the ``_avg``
    columns hold what Keras reports.

    Files in ``results/``:
        training_progress.txt: "progress accuracy loss" per batch (Appendix D);
            accuracy is ``nan`` when the model has no accuracy metric.
        training_progress_val.txt: "epoch val_accuracy val_loss" per epoch (1-based).
        training_progress.tsv: progress, epoch, batch, each metric's batch
            value, then each metric's running average as ``<metric>_avg``.
        training_progress_val.tsv: epoch, then every validation metric.

    Progress is ``epoch + batch / batches_per_epoch`` with 0-based epoch and
    batch, so the first row is 0.0. When Keras does not know the number of
    batches per epoch (a generator without a length), progress is the count of
    batches done before this one.

    Batch rows are appended at most every ``FLUSH_SECONDS`` (all rows since the
    last write in one write per file), and always at the end of every epoch and
    of training, so a fast training loop does not open two files per batch.

    Args:
        file_folder: should always be ``os.path.dirname(__file__)``.
        record: the run's ``TechniqueRecord``.
    """

    FLUSH_SECONDS = 0.2
    key = "training_progress"

    def __init__(self, file_folder, record=None):
        super().__init__()
        self.run_dir = storage.resolve_run_dir(file_folder)
        self.record = record or TechniqueRecord.shared(self.run_dir)
        self.record.register(self.key, "training progress", TRAINING_PROGRESS_FILE, {}, None)
        self._started = False
        self._step = 0
        self._lines, self._rows, self._columns = [], [], None
        self._flushed_at = None
        # Training stopped by an exception (Ctrl-C included) skips on_train_end.
        atexit.register(_flush_at_exit, weakref.ref(self))

    def _path(self, file_name):
        return storage.results_path(self.run_dir, file_name)

    def on_train_begin(self, logs=None):
        self.record.update(self.key, state=storage.TECHNIQUE_ACTIVE, first_snapshot_step=0)
        self._flush()  # rows of an earlier fit that ended without on_train_end
        if not self._started:
            # A new run starts new tables rather than continuing an old run's.
            _remove_files(self._path(name) for name in (
                TRAINING_PROGRESS_FILE, TRAINING_PROGRESS_VAL_FILE,
                TRAINING_PROGRESS_TABLE, TRAINING_PROGRESS_VAL_TABLE))
            self._started = True
        self._columns = None
        self._flushed_at = None  # the first row of a fit is written at once
        self._loss_tracker = next((m for m in self.model.metrics
                                   if m.name == "loss" and isinstance(m, keras.metrics.Mean)), None)
        self._metric_names = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._previous_averages = {}
        self._previous_count = 0.0
        self._batches_done = 0

    def _sample_count(self):
        """Samples seen in this epoch so far, or None if the model does not say."""
        if self._loss_tracker is None:
            return None
        # The backend variable read directly: a fifth of keras.ops.convert_to_numpy's time.
        return float(self._loss_tracker.count.value)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if self._metric_names is None:
            self._metric_names = [name for name in logs if np.ndim(logs[name]) == 0]
            self._accuracy_name = next(
                (name for name in ("accuracy", "acc") if name in self._metric_names),
                next((name for name in self._metric_names if name.endswith("accuracy")), None))
        averages = {name: float(logs.get(name, np.nan)) for name in self._metric_names}
        count = self._sample_count()
        if count is not None and count > self._previous_count:
            size, previous = count - self._previous_count, self._previous_count
        else:
            # No sample count: take the batches as equally large.
            count, size, previous = self._batches_done + 1.0, 1.0, float(self._batches_done)
        values = {name: (count * averages[name]
                         - previous * self._previous_averages.get(name, 0.0)) / size
                  for name in self._metric_names}
        self._previous_averages, self._previous_count = averages, count
        self._batches_done += 1
        self._step += 1

        steps = self.params.get("steps") if self.params else None
        progress = self._epoch + batch / steps if steps else float(self._step - 1)
        accuracy = values[self._accuracy_name] if self._accuracy_name else np.nan
        if self._columns is None:
            self._columns = (["progress", "epoch", "batch"] + self._metric_names
                             + [name + "_avg" for name in self._metric_names])
        self._lines.append("%r %r %r" % (progress, float(accuracy), float(values.get("loss", np.nan))))
        self._rows.append([progress, self._epoch, batch] + [values[name] for name in self._metric_names]
                          + [averages[name] for name in self._metric_names])
        now = time.monotonic()
        if self._flushed_at is None or now - self._flushed_at >= self.FLUSH_SECONDS:
            self._flush()
            self._flushed_at = now

    def _flush(self):
        """Write the batch rows kept since the last write: one write per file."""
        lines, rows, self._lines, self._rows = self._lines, self._rows, [], []
        storage.append_lines(self._path(TRAINING_PROGRESS_FILE), lines)
        storage.append_rows(self._path(TRAINING_PROGRESS_TABLE), self._columns, rows)

    def on_train_end(self, logs=None):
        self._flush()

    def on_epoch_end(self, epoch, logs=None):
        self._flush()
        logs = logs or {}
        val_names = [name for name in logs if name.startswith("val_") and np.ndim(logs[name]) == 0]
        if not val_names:
            return
        val_accuracy = next((logs[name] for name in ("val_accuracy", "val_acc") if name in logs),
                            next((logs[name] for name in val_names if name.endswith("accuracy")),
                                 np.nan))
        storage.append_line(self._path(TRAINING_PROGRESS_VAL_FILE), "%d %r %r" % (
            epoch + 1, float(val_accuracy), float(logs.get("val_loss", np.nan))))
        storage.append_row(self._path(TRAINING_PROGRESS_VAL_TABLE), ["epoch"] + val_names,
                           [epoch + 1] + [float(logs[name]) for name in val_names])


class TechniqueRecord:
    """What the script registered and what became of each technique, in ``results/techniques.json``.

    One record per run folder, shared by the callbacks of a ``CustomCallbacks``
    (format in ``custom_keras.storage``). The file is replaced whole at every
    registration and state change, so the first write of a run drops the
    entries of an earlier run in the same folder.

    Args:
        run_dir: the run folder.
    """

    _shared = {}

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.entries = {}

    @classmethod
    def shared(cls, run_dir):
        """The record of callbacks created on their own (without ``CustomCallbacks``)."""
        return cls._shared.setdefault(run_dir, cls(run_dir))

    def register(self, key, title, results_file, params, interval):
        """Add a technique in state "registered"; written at once, so a script that fails
        before training still shows what it registered."""
        self.entries[key] = {"registered": True, "title": title, "results_file": results_file,
                             "params": _json_safe(params), "interval": interval,
                             "state": storage.TECHNIQUE_REGISTERED, "reason": None,
                             "first_snapshot_step": None, "input_kind": None}
        self.write()

    def update(self, key, **changes):
        self.entries[key].update(changes)
        self.write()

    def write(self):
        try:
            storage.write_techniques(self.run_dir, self.entries)
        except OSError as error:  # the record must never stop the training
            print("[visualizer] %s not written: %s" % (storage.TECHNIQUES_FILE, _one_line(error)),
                  file=sys.stderr, flush=True)


def _json_safe(value):
    """Arguments as JSON: numbers, strings, lists and dicts as they are, anything else by name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return "array %s" % (value.shape,)
    return getattr(value, "__name__", None) or type(value).__name__


def _model_is_built(model):
    try:
        return bool(model.inputs)
    except (AttributeError, ValueError):
        return False


class _SnapshotCallback(keras.callbacks.Callback):
    """Schedule, output and failure isolation shared by the visualizing callbacks.

    A subclass sets ``key``, ``results_file`` and ``title`` and defines
    ``build()``, which prepares its technique once the model is built (the
    inputs are known then: ``input_kind``, ``image_names``, ``inputs``), and
    ``compute()``, which returns ``(results_by_image, info_by_image)`` for one
    snapshot. ``build()`` runs once per model: a later ``fit`` of the same model
    reuses the technique (and its compiled graphs), which reads the weights as
    they are at each snapshot.

    The technique is built when training begins, or, for a model that Keras
    builds with its first batch (a Sequential without ``keras.Input``), right
    after that batch, and stage 0 is taken then. A technique that cannot handle
    the model or the inputs (at build, or at any snapshot) is switched off for
    this run: one line on stderr, the reason in ``techniques.json``, and the
    training goes on.

    Args:
        file_folder: should always be ``os.path.dirname(__file__)``.
        interval: compute a snapshot every ``interval`` batches.
        custom_preprocess: optional function float32 (H, W, C) in 0..255 -> the
            model's input; replaces the default scaling to [0, 1].
        custom_postprocess: optional function applied to every output image
            before it is saved.
        uses_images: whether the technique needs the visualization inputs.
        visualization_inputs: optional array (N,) + the model's input shape, as
            fed to the model; replaces the images folder.
        record: the run's ``TechniqueRecord``; by default the one of the run folder.
        params: the register call's arguments, for the record.
        history_limit: the most snapshots kept in the history (see
            ``custom_keras.storage``): all recent ones, older ones thinned evenly.
    """

    key = None
    results_file = None
    title = None

    def __init__(self, file_folder, interval, custom_preprocess=None, custom_postprocess=None,
                 uses_images=True, visualization_inputs=None, record=None, params=None,
                 history_limit=storage.HISTORY_LIMIT):
        super().__init__()
        self.history_limit = _check_history_limit(history_limit)
        self.run_dir = storage.resolve_run_dir(file_folder)
        self.interval = _check_interval(interval)
        self.custom_preprocess = _check_function(custom_preprocess, "custom_preprocess")
        self.custom_postprocess = _check_function(custom_postprocess, "custom_postprocess")
        self.visualization_inputs = check_inputs_array(visualization_inputs)
        self._loaded_images = (visualization_images.load_images(self.run_dir)
                               if uses_images and self.visualization_inputs is None else {})
        self.record = record or TechniqueRecord.shared(self.run_dir)
        self.record.register(self.key, self.title, self.results_file,
                             dict(params or {}, interval=self.interval), self.interval)
        self.switched_off = False
        self._ready = False
        self._has_started = False  # built and took stage 0 at least once
        self._started = False
        self._stage = 0
        self._step = 0
        self._epoch = 0
        self._epoch_start_step = 0
        self._built_for = None
        self._kept_stages = []

    def on_train_begin(self, logs=None):
        if not self._started:
            self._clear_previous_run()
            self._started = True
        else:
            self._stage += 1
        self._epoch = 0
        self._ready = False
        if self.switched_off:
            return
        if _model_is_built(self.model):
            self._start(batch=0)
        else:
            self.record.update(self.key, state=storage.TECHNIQUE_WAITING,
                               first_snapshot_step=self._step + 1,
                               reason="the model is built by its first batch (no keras.Input), "
                                      "so the first snapshot comes after it")

    def _start(self, batch):
        """Prepare the inputs, build the technique once per model, take stage 0."""
        try:
            self.input_kind, self.image_names, as_fed, self.inputs = self.prepare_inputs()
            if self._built_for is not self.model:
                self.build()
                self._built_for = self.model
        except Exception as error:  # a technique that cannot serve this model: off, not fatal
            self._switch_off(error,
                             "when training began" if batch == 0 else "after the first batch")
            return
        self.record.update(self.key, state=storage.TECHNIQUE_ACTIVE, reason=None,
                           first_snapshot_step=self._step, input_kind=self.input_kind)
        try:
            if as_fed is not None:
                storage.write_input_images(self.run_dir, as_fed)
            if self.inputs is not None:
                storage.write_visualization_inputs(self.run_dir,
                                                   dict(zip(self.image_names, self.inputs)))
        except OSError as error:
            print("[visualizer] %s: inputs not written: %s" % (self.title, _one_line(error)),
                  file=sys.stderr, flush=True)
        self._ready = self._has_started = True
        self._snapshot(batch)

    def prepare_inputs(self):
        """(input kind, names, {name: uint8 image} or None, float32 batch) for this model."""
        return prepare_inputs(self.model, self._loaded_images, self.visualization_inputs,
                              self.custom_preprocess)

    def _switch_off(self, error, when):
        self.switched_off, self._ready = True, False
        reason = (" ".join(str(error).split()) if isinstance(error, NotApplicable)
                  else _one_line(error))
        print("[visualizer] %s switched off %s: %s" % (self.title, when, reason),
              file=sys.stderr, flush=True)
        changes = {} if self._has_started else {"first_snapshot_step": None}
        self.record.update(self.key, state=storage.TECHNIQUE_SWITCHED_OFF, reason=reason, **changes)

    def _clear_previous_run(self):
        """A new run starts a new history rather than mixing with an old run's."""
        shutil.rmtree(storage.history_dir(self.run_dir, self.results_file), ignore_errors=True)
        self._kept_stages = []
        _remove_files([storage.results_path(self.run_dir, self.results_file)] + glob.glob(
            storage.per_image_path(self.run_dir, "*", self.results_file)))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start_step = self._step

    def on_train_batch_end(self, batch, logs=None):
        # From the batch index, so that steps_per_execution > 1 (one call for
        # several batches, the last index possibly past the epoch's end) keeps
        # the schedule.
        batches_done = min(batch + 1, self.params.get("steps") or batch + 1)
        previous, self._step = self._step, self._epoch_start_step + batches_done
        if self.switched_off:
            return
        if not self._ready:
            if _model_is_built(self.model):
                self._start(batch=batches_done)
            else:
                self._switch_off(NotApplicable(
                    "needs a Sequential or functional model: this one has no inputs to trace even "
                    "after its first batch (a subclassed keras.Model)"), "after the first batch")
            return
        if self._step // self.interval > previous // self.interval:
            self._stage += 1
            self._snapshot(batch=batches_done)

    def _snapshot(self, batch):
        steps = self.params.get("steps") if self.params else None
        tags = {"stage": self._stage, "epoch": self._epoch, "batch": batch, "step": self._step,
                "progress": self._step / steps if steps else float(self._step)}
        try:
            results_by_image, info_by_image = self.compute()
        except Exception as error:  # a visualization must never stop the training
            self._switch_off(error, "at stage %d" % self._stage)
            return
        try:
            newest = self.image_names[-1] if self.image_names else NO_IMAGE
            storage.write_snapshot(self.run_dir, self.results_file, results_by_image, newest,
                                   tags, info_by_image)
            self._kept_stages = storage.thin_history(
                self.run_dir, self.results_file, self._kept_stages + [self._stage],
                self.history_limit)
        except OSError as error:  # a full disk may clear up: the next snapshot tries again
            print("[visualizer] %s not written at stage %d: %s" % (self.title, self._stage,
                                                                   _one_line(error)),
                  file=sys.stderr, flush=True)

    def postprocess(self, image):
        """An output as stored: for image inputs uint8 (``custom_postprocess`` if given, then
        scaled unless already uint8); for sequences and feature vectors float32 as computed."""
        if self.input_kind != "image":
            return np.asarray(image, dtype=np.float32)
        if self.custom_postprocess is not None:
            image = np.asarray(self.custom_postprocess(image))
        return image if image.dtype == np.uint8 else to_uint8(image)


class LayerActivations(_SnapshotCallback):
    """Saves the output of every layer, except the excluded ones, for each visualization input.

    ``results/layer_activations.pickle``: ``[("Layer 1: conv2d", uint8 (filters, H, W)),
    ("Layer 6: dense", uint8 (units,)), ("Layer 2: conv1d", uint8 (filters, T)), ...]``.

    Args:
        file_folder: should always be ``os.path.dirname(__file__)``.
        exclude_layers: tuple of Keras layer classes not to show; the default
            excludes InputLayer, Dropout and Flatten.
        custom_preprocess: optional function applied to each visualization image
            (float32 (H, W, C) in 0..255) instead of scaling to [0, 1].
        interval: compute the activations every ``interval`` batches.
        visualization_inputs: optional array (N,) + the model's input shape.
        record: the run's ``TechniqueRecord``.
        history_limit: the most snapshots kept in the history.
    """

    key = "layer_activations"
    results_file = registry.get(key).results_file
    title = "layer activations"

    def __init__(self, file_folder, exclude_layers=EXCLUDE_LAYERS, custom_preprocess=None,
                 interval=10, visualization_inputs=None, record=None,
                 history_limit=storage.HISTORY_LIMIT):
        self.exclude_layers = check_exclude_layers(exclude_layers)
        super().__init__(file_folder, interval, custom_preprocess,
                         visualization_inputs=visualization_inputs, record=record,
                         params=dict(exclude_layers=exclude_layers), history_limit=history_limit)

    def build(self):
        self._activations = ActivationModel(self.model, self.exclude_layers)

    def compute(self):
        return dict(zip(self.image_names, self._activations(self.inputs))), {}


class SaliencyMaps(_SnapshotCallback):
    """Saves the saliency of each visualization input for its predicted class.

    ``results/saliency_maps.pickle``: for images uint8 (H, W, 1); for sequences
    and feature vectors the dict of ``custom_keras.storage``'s docstring (the
    gradient, gradient x input, the input, and ``feature_names`` if given). Each
    snapshot's history also holds the predicted class and its confidence per
    input (or ``{"score": ...}`` for a model with one output unit: a sigmoid's
    logit, a regression's value).

    Args:
        file_folder: should always be ``os.path.dirname(__file__)``.
        custom_preprocess: optional function applied to each visualization image
            (float32 (H, W, C) in 0..255) instead of scaling to [0, 1].
        custom_postprocess: optional function applied to each saliency map
            (uint8 (H, W, 1)) before it is saved.
        interval: compute the maps every ``interval`` batches.
        visualization_inputs: optional array (N,) + the model's input shape.
        feature_names: optional names of the features of a tabular input.
        record: the run's ``TechniqueRecord``.
        history_limit: the most snapshots kept in the history.
    """

    key = "saliency_maps"
    results_file = registry.get(key).results_file
    title = "saliency maps"

    def __init__(self, file_folder, custom_preprocess=None, custom_postprocess=None, interval=10,
                 visualization_inputs=None, feature_names=None, record=None,
                 history_limit=storage.HISTORY_LIMIT):
        self.feature_names = _check_feature_names(feature_names)
        super().__init__(file_folder, interval, custom_preprocess, custom_postprocess,
                         visualization_inputs=visualization_inputs, record=record,
                         history_limit=history_limit)

    def build(self):
        if self.feature_names is not None and (
                self.input_kind != "tabular" or len(self.feature_names) != self.inputs.shape[-1]):
            raise ValueError("feature_names: %d names for a %s input of shape %s" % (
                len(self.feature_names), self.input_kind, self.inputs.shape[1:]))
        self._saliency = SaliencyModel(self.model)

    def compute(self):
        gradients, scores = self._saliency.gradients(self.inputs)
        if self.input_kind == "image":
            maps, _, _ = self._saliency.maps_from(gradients, scores)
            results = {name: self.postprocess(maps[i]) for i, name in enumerate(self.image_names)}
        else:
            results = {}
            for i, name in enumerate(self.image_names):
                results[name] = {"gradient": gradients[i], "input": self.inputs[i],
                                 "gradient_x_input": gradients[i] * self.inputs[i]}
                if self.feature_names is not None:
                    results[name]["feature_names"] = list(self.feature_names)
        info = {name: prediction_info(score) for name, score in zip(self.image_names, scores)}
        return results, info


def prediction_info(scores):
    """What the model predicted for one input, from its pre-softmax scores: the class and its
    probability, or for one output unit its score (a sigmoid's logit, a regression's value)."""
    if len(scores) == 1:
        return {"score": float(scores[0])}
    return {"predicted_class": int(np.argmax(scores)), "confidence": float(softmax(scores).max())}


def _check_feature_names(feature_names):
    return _check_names(feature_names, "feature_names")


class DeconvolutionalNetwork(_SnapshotCallback):
    """Saves deconvolutional-network reconstructions of feature maps of one layer.

    ``results/deconvolutional_network.pickle``: ``[(uint8 (H, W, C), layer_name,
    feat_map_no), ...]``, for feat_map_amount ordered by descending activation;
    for sequences the reconstructions are float32 (T, C).

    Args:
        file_folder: should always be ``os.path.dirname(__file__)``.
        feat_map_layer_no: the layer (index into ``model.layers``) whose feature
            maps are shown; a convolutional or pooling layer.
        feat_map_amount: show the N most active feature maps (-1: all of them).
        feat_map_nos: or show these feature map numbers; give exactly one of
            feat_map_amount and feat_map_nos.
        custom_preprocess: optional function applied to each visualization image
            (float32 (H, W, C) in 0..255) instead of scaling to [0, 1].
        custom_postprocess: optional function applied to each reconstruction
            (float32 (H, W, C) in model-input space) before scaling to uint8.
        custom_keras_model_info: optional hand-built deconvolutional model as
            ``(deconv_model, layer_map, update_function)`` (thesis Appendix C).
        interval: compute the reconstructions every ``interval`` batches.
        visualization_inputs: optional array (N,) + the model's input shape.
        record: the run's ``TechniqueRecord``.
        history_limit: the most snapshots kept in the history.
    """

    key = "deconvolutional_network"
    results_file = registry.get(key).results_file
    title = "deconvolutional network"

    def __init__(self, file_folder, feat_map_layer_no, feat_map_amount=None, feat_map_nos=None,
                 custom_preprocess=None, custom_postprocess=None, custom_keras_model_info=None,
                 interval=10, visualization_inputs=None, record=None,
                 history_limit=storage.HISTORY_LIMIT):
        # What can be checked without the model is checked now; the rest at build.
        check_deconvolution_selection(feat_map_layer_no, feat_map_amount, feat_map_nos)
        super().__init__(file_folder, interval, custom_preprocess, custom_postprocess,
                         visualization_inputs=visualization_inputs, record=record,
                         params=dict(feat_map_layer_no=feat_map_layer_no,
                                     feat_map_amount=feat_map_amount, feat_map_nos=feat_map_nos,
                                     custom_keras_model_info=custom_keras_model_info is not None),
                         history_limit=history_limit)
        self.feat_map_layer_no = feat_map_layer_no
        self.feat_map_amount = feat_map_amount
        self.feat_map_nos = feat_map_nos
        self.custom_keras_model_info = custom_keras_model_info

    def build(self):
        if self.input_kind == "tabular":
            raise NotApplicable(
                "needs feature maps: a model with a feature-vector input %s has none"
                % (tuple(self.inputs.shape[1:]),))
        self._deconvolution = DeconvolutionModel(
            self.model, self.feat_map_layer_no, self.feat_map_amount, self.feat_map_nos,
            self.custom_keras_model_info)

    def compute(self):
        reconstructions = self._deconvolution(self.inputs)
        results = {name: [(self.postprocess(image), layer_name, int(feat_map_no))
                          for image, layer_name, feat_map_no in reconstructions[i]]
                   for i, name in enumerate(self.image_names)}
        return results, {}


class DeepVisualization(_SnapshotCallback):
    """Saves synthetic inputs that maximally activate the chosen units (Yosinski et al.).

    ``results/deep_visualization.pickle``: ``[(uint8 (H, W, C), layer_name,
    unit_index, loss_value), ...]`` in the order of ``units_to_visualize``; for
    sequences and feature vectors the synthetic input is float32 (T, C) or (F,).
    The technique does not use the visualization inputs; its result is stored
    under every input's name (or ``NO_IMAGE`` when there is none).

    Args:
        file_folder: should always be ``os.path.dirname(__file__)``.
        units_to_visualize: list of ``(layer_no, unit_index)``; unit_index is an
            int for 1-D outputs and a ``(row, col, channel)`` tuple for 3-D ones.
        learning_rate: step size of the gradient ascent.
        no_of_iterations: number of gradient-ascent steps.
        l2_decay: L2 decay per step, in [0, 1]; 0 disables it.
        blur_interval: blur every this many steps; 0 disables blurring.
        blur_std: standard deviation of the Gaussian blur; 0 disables it.
        value_percentile: clip pixels with small absolute value, in [0, 100].
        norm_percentile: clip pixels with small norm, in [0, 100].
        contribution_percentile: clip pixels with small contribution, in [0, 100].
        abs_contribution_percentile: clip pixels with small absolute
            contribution, in [0, 100].
        custom_postprocess: optional function applied to each synthetic image
            (float32 (H, W, C) in model-input space) before scaling to uint8.
        interval: compute the images every ``interval`` batches.
        visualization_inputs: optional array; only its names are used.
        record: the run's ``TechniqueRecord``.
        history_limit: the most snapshots kept in the history.
    """

    key = "deep_visualization"
    results_file = registry.get(key).results_file
    title = "deep visualization"

    def __init__(self, file_folder, units_to_visualize, learning_rate, no_of_iterations,
                 l2_decay=0, blur_interval=0, blur_std=0, value_percentile=0, norm_percentile=0,
                 contribution_percentile=0, abs_contribution_percentile=0,
                 custom_postprocess=None, interval=10, visualization_inputs=None, record=None,
                 history_limit=storage.HISTORY_LIMIT):
        self.regularizers = dict(
            learning_rate=learning_rate, no_of_iterations=no_of_iterations, l2_decay=l2_decay,
            blur_interval=blur_interval, blur_std=blur_std, value_percentile=value_percentile,
            norm_percentile=norm_percentile, contribution_percentile=contribution_percentile,
            abs_contribution_percentile=abs_contribution_percentile)
        check_regularizers(**self.regularizers)
        check_unit_list(units_to_visualize)
        super().__init__(file_folder, interval, custom_postprocess=custom_postprocess,
                         uses_images=False, visualization_inputs=visualization_inputs,
                         record=record,
                         params=dict(self.regularizers, units_to_visualize=units_to_visualize),
                         history_limit=history_limit)
        self.units_to_visualize = units_to_visualize

    def prepare_inputs(self):
        """The input kind and the names to store the results under; no inputs of its own."""
        kind = input_kind(self.model)
        if self.visualization_inputs is not None:
            names = input_names(len(self.visualization_inputs))
        else:
            names = storage.list_images(self.run_dir) or [NO_IMAGE]
        return kind, names, None, None

    def build(self):
        if None in tuple(self.model.inputs[0].shape[1:]):
            raise ValueError("model: deep visualization needs a fixed input size, the model's "
                             "input is %s" % (tuple(self.model.inputs[0].shape),))
        # Built once: its compiled optimisation loop then serves every snapshot.
        self._deep_visualization = DeepVisualizationModel(self.model, self.units_to_visualize,
                                                          **self.regularizers)

    def compute(self):
        result = [(self.postprocess(image), layer_name, index, value)
                  for image, layer_name, index, value in self._deep_visualization()]
        return {name: result for name in self.image_names}, {}


class AttributionMaps(_SnapshotCallback):
    """Saves the maps of one attribution method declared in ``custom_keras.registry``.

    One class serves every declared method: it calls the declaration's pure
    function (``technique.function``) with the register call's arguments on the
    visualization inputs at every snapshot, and scales the maps for display.
    The graphs are compiled once per model by the function itself.

    ``results/<key>.pickle`` holds per input a dict:
    ``{"map": uint8, "signed": bool, "method": key}`` and, for
    ``technique.companions``, their maps under their names (guided Grad-CAM
    beside guided backpropagation). By ``technique.display``:

    - unsigned (the CAMs): ``"map"`` (H, W), 0..max scaled to 0..255;
    - signed (SmoothGrad, Integrated Gradients, occlusion, LRP): summed over
      channels to (H, W), 128 meaning 0, 255 +max|v| and 0 -max|v|;
    - image-like (guided backpropagation): (H, W, C) per channel,
      ``custom_postprocess`` if given, then min..max scaled to 0..255.

    For a sequence (T, C) or tabular (F,) input, a method that handles it
    (no ``IMAGE_INPUT`` in ``technique.needs``) stores ``"values"``: the float32 attributions
    shaped like the input, instead of ``"map"``; the others are switched off.
    The snapshot's info per input: ``{"class_index": int, "class_source":
    "predicted"|"fixed"|"label", "probability": float (softmax of the
    pre-softmax scores, a sigmoid for one output unit), "predicted_class": int}``
    and ``"class_names"`` when given.

    Args:
        file_folder: should always be ``os.path.dirname(__file__)``.
        technique: the method's ``registry.Technique``.
        interval: compute the maps every ``interval`` batches.
        params: the register call's arguments for the function, by name.
        custom_preprocess: optional function applied to each visualization image
            (float32 (H, W, C) in 0..255) instead of scaling to [0, 1].
        custom_postprocess: optional function applied to each image-like map
            (float32 (H, W, C)) before scaling to uint8.
        visualization_inputs: optional array (N,) + the model's input shape.
        visualization_labels: the true classes of the visualization inputs, for
            ``class_index="label"``: {input name: class} or one class (or
            one-hot row) per input in their order.
        class_names: optional names of the classes, kept with every snapshot.
        record: the run's ``TechniqueRecord``.
        history_limit: the most snapshots kept in the history.
    """

    def __init__(self, file_folder, technique, interval=10, params=None, custom_preprocess=None,
                 custom_postprocess=None, visualization_inputs=None, visualization_labels=None,
                 class_names=None, record=None, history_limit=storage.HISTORY_LIMIT):
        self.technique = technique
        self.key, self.title, self.results_file = technique.key, technique.title, technique.results_file
        self.function = registry.load(technique.function)
        # not self.params: Keras sets that to the fit's settings
        self.arguments = dict(params or {})
        self.class_index = _check_class_index(self.arguments.get("class_index"))
        self.visualization_labels = _check_labels(visualization_labels)
        self.class_names = _check_names(class_names, "class_names")
        super().__init__(file_folder, interval, custom_preprocess, custom_postprocess,
                         visualization_inputs=visualization_inputs, record=record,
                         params=self.arguments, history_limit=history_limit)

    def build(self):
        technique = self.technique
        if registry.IMAGE_INPUT in technique.needs and self.input_kind != "image":
            raise NotApplicable("%s needs an image input (H, W, C); this model's input is %s %s"
                                % (technique.title, _kind_words(self.input_kind),
                                   tuple(self.inputs.shape[1:])))
        try:
            attribution_graph.score_node(self.model)
        except ValueError as error:
            raise NotApplicable("%s needs %s" % (technique.title, error)) from None
        if registry.SPATIAL_LAYER in technique.needs:
            try:
                attribution_graph.spatial_layer_no(self.model, self.arguments.get("layer_no"))
            except ValueError as error:
                raise NotApplicable("%s needs a layer with a spatial output: %s" % (
                    technique.title, error)) from None
        self.labels = self._labels_of_inputs()
        classes = int(self.model.outputs[0].shape[-1])
        if self.class_names is not None and len(self.class_names) != classes:
            raise NotApplicable("class_names has %d names for a model with %d classes"
                                % (len(self.class_names), classes))
        self.classes = attribution_graph.class_indices(self.class_index, len(self.inputs), classes,
                                                       self.labels)
        self._scores = attribution_graph.compiled(
            self.model, ("scores",), lambda images, classes: attribution_graph.walk(
                self.model, images, attribution_graph.scores_visit(self.model))[0][0],
            attribution_graph.signature(self.model))
        self._companions = [(name, registry.load(path)) for name, path in technique.companions]
        self._companion_problems = {}

    def _labels_of_inputs(self):
        """The true class of every visualization input, in their order, or None."""
        labels = self.visualization_labels
        if labels is None:
            if self.class_index == "label":
                raise NotApplicable(
                    'class_index="label" needs the true class of every visualization input: pass '
                    "visualization_labels= to CustomCallbacks ({input name: class} or one class "
                    "per input)")
            return None
        if isinstance(labels, dict):
            missing = [name for name in self.image_names if name not in labels]
            if missing:
                raise NotApplicable("visualization_labels has no class for %s (it has %s)" % (
                    ", ".join(missing), ", ".join(map(str, sorted(labels, key=str)))))
            labels = [labels[name] for name in self.image_names]
        labels = np.asarray(labels)
        if len(labels) != len(self.image_names):
            raise NotApplicable("visualization_labels holds %d classes for %d visualization inputs"
                                % (len(labels), len(self.image_names)))
        return np.argmax(labels, axis=-1) if labels.ndim == 2 else labels

    def compute(self):
        scores = self._scores(self.inputs, self.classes).numpy()
        arguments = dict(self.arguments, labels=self.labels)
        maps = self.function(self.model, self.inputs, **arguments)
        companions = {}
        for name, function in self._companions:
            try:
                accepted = inspect.signature(function).parameters
                companions[name] = function(self.model, self.inputs, **{
                    key: value for key, value in arguments.items() if key in accepted})
            except ValueError as error:  # e.g. no spatial layer for guided Grad-CAM: without it
                self._note_missing_companion(name, error)
        results, info = {}, {}
        for i, name in enumerate(self.image_names):
            results[name] = dict(self._displayed(maps[i]), method=self.key)
            for companion, values in companions.items():
                results[name][companion] = self._displayed(values[i])["map" if self.input_kind
                                                                      == "image" else "values"]
            info[name] = self._class_info(scores[i], int(self.classes[i]))
        return results, info

    def _note_missing_companion(self, name, error):
        if name not in self._companion_problems:
            self._companion_problems[name] = "without %s: %s" % (name.replace("_", " "),
                                                                 _one_line(error))
            self.record.update(self.key, reason="; ".join(self._companion_problems.values()))

    def _displayed(self, values):
        """One input's attribution as stored: {"map": uint8, "signed"} or {"values": float32,
        "signed"}."""
        signed = self.technique.display == registry.SIGNED
        if self.input_kind != "image":
            return {"values": np.asarray(values, dtype=np.float32), "signed": signed}
        if self.technique.display == registry.IMAGE_LIKE:
            return {"map": self.postprocess(values), "signed": False}
        if signed:
            return {"map": signed_to_uint8(values), "signed": True}
        return {"map": scale_by_max(values), "signed": False}

    def _class_info(self, scores, class_index):
        """The explained class, why it was chosen, its probability and the predicted class."""
        probabilities = softmax(scores) if len(scores) > 1 else 1 / (1 + np.exp(-scores))
        info = {"class_index": int(np.argmax(scores)) if class_index < 0 else class_index,
                "class_source": ("predicted" if self.class_index is None else
                                 "label" if self.class_index == "label" else "fixed"),
                "predicted_class": int(np.argmax(scores))}
        info["probability"] = float(probabilities[info["class_index"]])
        if self.class_names is not None:
            info["class_names"] = list(self.class_names)
        return info


def signed_to_uint8(values):
    """A signed map for display: summed over channels, 0 at 128, +-max|v| at 255 and 0."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 3:
        values = values.sum(axis=-1)
    largest = np.max(np.abs(values)) if values.size else 0.0
    if not np.isfinite(largest) or largest <= 0:
        return np.full(values.shape, 128, dtype=np.uint8)
    return np.rint(127.5 + 127.5 * values / largest).astype(np.uint8)


def _kind_words(kind):
    return {"sequence": "a sequence", "tabular": "a feature vector"}.get(kind, "of kind " + str(kind))


def _check_class_index(class_index):
    """None, a class number >= 0 or "label"; anything else is wrong whatever the model."""
    if class_index is None or class_index == "label":
        return class_index
    if not isinstance(class_index, (int, np.integer)) or isinstance(class_index, bool) \
            or class_index < 0:
        raise ValueError('class_index must be None (the predicted class), a class number >= 0 or '
                         '"label" (the true class), got %r' % (class_index,))
    return int(class_index)


def _check_labels(labels):
    """{input name: class}, or classes (or one-hot rows) in the inputs' order, or None."""
    if labels is None:
        return None
    if isinstance(labels, dict):
        if not all(isinstance(name, str) for name in labels):
            raise TypeError("visualization_labels: the keys must be input names (str), got %r"
                            % (list(labels),))
        values = list(labels.values())
    else:
        values = labels
    array = np.asarray(values)
    if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.number) or \
            (array.ndim == 1 and not np.issubdtype(array.dtype, np.integer)):
        raise TypeError("visualization_labels must be class numbers or one-hot rows, one per "
                        "visualization input (a list, an array or {input name: class}), got %r"
                        % (labels,))
    return dict(labels) if isinstance(labels, dict) else array


def _check_names(names, argument):
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError("%s must be a list of strings, got %r" % (argument, names))
    return list(names)


def _switches_off_on_error(hook):
    """A ``HealthChecks`` hook whose errors switch the checks off instead of the training."""
    def guarded(self, *args, **kwargs):
        if self.switched_off:
            return
        try:
            hook(self, *args, **kwargs)
        except Exception as error:  # the checks must never stop the training
            self._switch_off(error)
    guarded.__name__ = hook.__name__
    return guarded


class HealthChecks(keras.callbacks.Callback):
    """Watches the training for signs that it is going wrong and writes alerts.

    Every batch: the loss and every metric for NaN or Inf, and the batch's loss
    for the smoothed-loss trend. Every ``interval`` batches: per-layer gradient
    norms on ``sample_size`` samples of that step's batch and the fraction of dead
    ReLU units on the whole batch, measured inside the training step
    (``HealthProbe``: no data of its own), written to ``results/gradient_norms.tsv`` and
    ``results/dead_units.tsv``. Every epoch: validation against training loss,
    and whether the loss still decreases.

    Alerts (kinds in ``custom_keras.techniques.health``, format in
    ``custom_keras.storage``) go to ``results/alerts.jsonl`` and one line on
    stderr (``[visualizer alert] ...``), each with its reason and what to try;
    one alert (kind and layer) is written when it appears and again only after it
    has cleared, at most ``AlertGate.per_epoch`` times an epoch.

    The checks never stop the training: an error inside them switches them off
    with the reason in ``results/techniques.json``. A model with several outputs
    (or one Keras cannot trace) gets the checks that need no gradients only; the
    record's ``reason`` says so.

    Args:
        file_folder: should always be ``os.path.dirname(__file__)``.
        interval: measure gradient norms and dead units every ``interval`` batches.
        sample_size: the number of samples of a training batch the gradients are
            measured on (dead units: the whole batch).
        record: the run's ``TechniqueRecord``.
        **thresholds: the alert thresholds, keyword arguments of
            ``custom_keras.techniques.health.Thresholds`` (``exploding_norm=1e3``,
            ``exploding_growth=10``, ``vanishing_ratio=1e-3``, ``vanishing_norm=1e-4``,
            ``dead_fraction=0.5``, ``overfitting_epochs=2``, ``plateau_fraction=0.3``,
            ``plateau_min_epochs=2``, ``plateau_min_delta=0.01``).
    """

    key = "health_checks"
    title = "health checks"

    def __init__(self, file_folder, interval=10, sample_size=32, record=None, **thresholds):
        super().__init__()
        self.run_dir = storage.resolve_run_dir(file_folder)
        self.interval = _check_interval(interval)
        self.sample_size = _check_interval(sample_size, "sample_size")
        self.thresholds = health.Thresholds(**thresholds)
        self.record = record or TechniqueRecord.shared(self.run_dir)
        self.record.register(self.key, self.title, storage.ALERTS_FILE,
                             dict(self.thresholds.as_dict(), interval=self.interval,
                                  sample_size=self.sample_size), self.interval)
        self.switched_off = False
        self._started = False
        self._probe = None
        self._probe_problem = None
        self._gate = health.AlertGate()
        self._step = 0
        self._epoch = 0
        self._batches_done = 0
        self._epoch_start_step = 0
        self._batch_losses = []
        self._epoch_losses, self._val_losses = [], []
        self._last_measurement = -1

    def _path(self, file_name):
        return storage.results_path(self.run_dir, file_name)

    def _switch_off(self, error):
        self.switched_off = True
        if self._probe is not None:
            self._probe.enabled.assign(False)
        reason = _one_line(error)
        print("[visualizer] %s switched off at epoch %d, batch %d: %s" % (
            self.title, self._epoch + 1, self._batches_done, reason), file=sys.stderr, flush=True)
        self.record.update(self.key, state=storage.TECHNIQUE_SWITCHED_OFF, reason=reason)

    @_switches_off_on_error
    def on_train_begin(self, logs=None):
        if not self._started:
            # A new run starts new alerts rather than continuing an old run's.
            _remove_files(self._path(name) for name in (
                storage.ALERTS_FILE, storage.GRADIENT_NORMS_TABLE, storage.DEAD_UNITS_TABLE))
            self._started = True
        self._start_probe()
        self.record.update(self.key, state=storage.TECHNIQUE_ACTIVE, first_snapshot_step=self._step,
                           reason=self._probe_problem)

    def _start_probe(self):
        """Build the probe once per model (a model built by its first batch gets none)."""
        if self._probe is not None and self._probe.model is self.model:
            self._probe.start(self.interval, self._step)
            return
        self._probe, self._probe_problem = None, None
        if not _model_is_built(self.model):
            self._probe_problem = ("without gradient norms and dead units: the model is built by "
                                   "its first batch (no keras.Input)")
            return
        try:
            self._probe = health.HealthProbe.of(self.model, self.sample_size)
        except Exception as error:  # the other checks go on without it
            self._probe_problem = "without gradient norms and dead units: %s" % _one_line(error)
            return
        self._probe.start(self.interval, self._step)

    @_switches_off_on_error
    def on_train_end(self, logs=None):
        if self._probe is not None:
            self._probe.enabled.assign(False)

    @_switches_off_on_error
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start_step = self._step
        self._previous_loss_average = None
        self._first_largest_norm = None
        self._gate.new_epoch()

    @_switches_off_on_error
    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        steps = self.params.get("steps") if self.params else None
        self._batches_done = min(batch + 1, steps or batch + 1)
        previous, self._step = self._step, self._epoch_start_step + self._batches_done
        self._check_finite(logs)
        if "loss" in logs:
            average = float(logs["loss"])
            self._batch_losses.append(health.batch_loss(
                average, self._previous_loss_average, self._batches_done)
                if self._previous_loss_average is not None else average)
            self._previous_loss_average = average
        # the probe measured in the batch that began at step 0, interval, 2 * interval, ...
        if self._probe is not None and \
                (self._step - 1) // self.interval > (previous - 1) // self.interval:
            self._check_probe()

    def _check_finite(self, logs):
        names = health.nonfinite_metrics(logs)
        if self._gate.update((health.NAN_LOSS, None), bool(names)):
            values = ", ".join("%s = %s" % (name, float(logs[name])) for name in names)
            self._alert(health.NAN_LOSS, "%s: the training has diverged and the weights are no "
                        "longer usable." % values, float(logs[names[0]]))

    def _check_probe(self):
        if self._probe.failure is not None:
            if self._probe_problem is None:
                self._probe_problem = "without gradient norms and dead units: %s" % _one_line(
                    self._probe.failure)
                self.record.update(self.key, reason=self._probe_problem)
            return
        measured_at, norms, dead = self._probe.read()
        if measured_at < 0 or measured_at == self._last_measurement:
            return
        self._last_measurement = measured_at
        # measured before the update of the batch that began at step measured_at
        position = [measured_at, self._epoch, max(measured_at - self._epoch_start_step, 0)]
        names = self._probe.layer_names
        storage.append_row(self._path(storage.GRADIENT_NORMS_TABLE),
                           ["step", "epoch", "batch"] + names, position + norms)
        if dead:
            storage.append_row(self._path(storage.DEAD_UNITS_TABLE),
                               ["step", "epoch", "batch"] + list(dead),
                               position + list(dead.values()))
        first = self._first_largest_norm
        exploding, largest = health.exploding_gradients(norms, first, self.thresholds)
        if first is None and math.isfinite(largest):
            self._first_largest_norm = largest
        if self._gate.update((health.EXPLODING_GRADIENTS, None), exploding):
            cause = ("above %g" % self.thresholds.exploding_norm
                     if largest > self.thresholds.exploding_norm else
                     "%.3g times the epoch's first (%.3g)" % (largest / first, first))
            self._alert(health.EXPLODING_GRADIENTS, (
                "The largest gradient norm is %.3g (layer %s), %s: the weight updates are too "
                "large and the training may diverge." % (
                    largest, names[norms.index(largest)], cause)), largest)
        vanishing, ratio = health.vanishing_gradients(norms, self.thresholds)
        if self._gate.update((health.VANISHING_GRADIENTS, None), vanishing):
            self._alert(health.VANISHING_GRADIENTS, (
                "The gradient norm of the first layer (%s) is %.3g, %.3g times that of the last "
                "layer (%s): the first layers barely learn." % (
                    names[0], norms[0], ratio, names[-1])), ratio)
        dead_now = health.dead_layers(dead, self.thresholds)
        for layer, fraction in dead.items():
            if self._gate.update((health.DEAD_UNITS, layer), layer in dead_now):
                self._alert(health.DEAD_UNITS, (
                    "%.0f%% of the units of layer %s output zero for every sample of a training "
                    "batch: dead ReLUs no longer learn." % (100 * fraction, layer)), fraction,
                    layer=layer)

    @_switches_off_on_error
    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self._check_finite(logs)
        if "loss" in logs and "val_loss" in logs:
            self._epoch_losses.append(float(logs["loss"]))
            self._val_losses.append(float(logs["val_loss"]))
            rising = health.overfitting(self._epoch_losses, self._val_losses, self.thresholds)
            if self._gate.update((health.OVERFITTING, None), rising):
                count = self.thresholds.overfitting_epochs + 1
                self._alert(health.OVERFITTING, (
                    "The validation loss rose for %d epochs in a row (%s) while the training "
                    "loss fell (%s): the network learns the training data by heart." % (
                        count - 1, " -> ".join("%.4g" % v for v in self._val_losses[-count:]),
                        " -> ".join("%.4g" % v for v in self._epoch_losses[-count:]))),
                    self._val_losses[-1])
        smoothed = health.smooth(self._batch_losses)
        flat = health.loss_not_decreasing(smoothed, epoch + 1, self.thresholds)
        if self._gate.update((health.LOSS_NOT_DECREASING, None), flat):
            self._alert(health.LOSS_NOT_DECREASING, (
                "The smoothed training loss has not improved over the last %.0f%% of the batches "
                "(now %.4g): the network is not learning." % (
                    100 * self.thresholds.plateau_fraction, smoothed[-1])), smoothed[-1])

    def _alert(self, kind, message, value, layer=None):
        value = float(value)
        alert = {"kind": kind, "epoch": self._epoch, "batch": self._batches_done,
                 "step": self._step, "message": message, "advice": health.ADVICE[kind],
                 "value": value if math.isfinite(value) else str(value), "time": time.time()}
        if layer is not None:
            alert["layer"] = layer
        print("[visualizer alert] epoch %d, batch %d: %s %s" % (
            self._epoch + 1, self._batches_done, message, health.ADVICE[kind]),
            file=sys.stderr, flush=True)
        storage.write_alert(self.run_dir, alert)


class CustomCallbacks:
    """Registers the callbacks with shared arguments; ``get_list()`` goes to ``model.fit``.

    Every technique is built and run on its own: one that cannot handle the
    model or the inputs is switched off for this run, with its reason in
    ``results/techniques.json``, and the training goes on. Arguments that are
    wrong whatever the model (an interval of 0, a learning rate below 0) raise
    at the register call.

    Args:
        file_folder: should always be ``os.path.dirname(__file__)``.
        custom_preprocess: optional function applied to each visualization image
            (float32 (H, W, C) in 0..255) instead of scaling to [0, 1].
        custom_postprocess: optional function applied to every output image
            before it is saved.
        base_interval: compute the visualizations every this many batches,
            unless a register call gives its own ``interval``.
        visualization_inputs: optional array (N,) + the model's input shape,
            exactly as fed to the model: the inputs to visualize instead of the
            images folder. Needed for sequence (T, C) and tabular (F,) models.
        feature_names: optional names of the features of a tabular input, kept
            with the saliency results.
        history_limit: the most snapshots each technique keeps in its history:
            every recent one, older ones thinned to an even spacing over the run,
            stage 0 and the latest always (see ``custom_keras.storage``).
        visualization_labels: optional true classes of the visualization inputs,
            for the attribution methods' ``class_index="label"``: {image file name
            (or ``input_<i>``): class} or one class (or one-hot row) per input in
            their order.
        class_names: optional names of the classes, kept with the attribution
            methods' results.

    Besides the methods below, every technique of ``custom_keras.registry`` with a
    pure function has ``register_<key>(<its parameters>, interval=None)`` (the
    attribution methods: ``register_grad_cam``, ``register_lrp``, ...), built from
    its declaration; ``help(CustomCallbacks.register_<key>)`` shows its arguments.
    """

    def __init__(self, file_folder, custom_preprocess=None, custom_postprocess=None,
                 base_interval=10, visualization_inputs=None, feature_names=None,
                 history_limit=storage.HISTORY_LIMIT, visualization_labels=None,
                 class_names=None):
        self.file_folder = storage.resolve_run_dir(file_folder)
        self.custom_preprocess = _check_function(custom_preprocess, "custom_preprocess")
        self.custom_postprocess = _check_function(custom_postprocess, "custom_postprocess")
        self.base_interval = _check_interval(base_interval, "base_interval")
        self.visualization_inputs = check_inputs_array(visualization_inputs)
        self.feature_names = _check_feature_names(feature_names)
        self.history_limit = _check_history_limit(history_limit)
        self.visualization_labels = _check_labels(visualization_labels)
        self.class_names = _check_names(class_names, "class_names")
        self.record = TechniqueRecord(self.file_folder)
        self.callback_list = []

    def settings(self):
        """The shared settings a declared technique's callback takes, by name."""
        return dict(custom_preprocess=self.custom_preprocess,
                    custom_postprocess=self.custom_postprocess,
                    visualization_inputs=self.visualization_inputs,
                    visualization_labels=self.visualization_labels,
                    class_names=self.class_names, record=self.record,
                    history_limit=self.history_limit)

    def get_list(self):
        """All registered callbacks, for ``model.fit(..., callbacks=...)``."""
        return self.callback_list

    def _interval(self, interval):
        return self.base_interval if interval is None else interval

    def register_network_saver(self, keep_epochs=False):
        self.callback_list.append(NetworkSaver(self.file_folder, record=self.record,
                                               keep_epochs=keep_epochs))

    def register_training_progress(self, health_checks=True):
        """Loss and metrics per batch; with ``health_checks`` also ``register_health_checks()``."""
        self.callback_list.append(TrainingProgress(self.file_folder, record=self.record))
        if health_checks:
            self.register_health_checks()

    def register_health_checks(self, interval=None, **thresholds):
        """Alerts when training goes wrong (``HealthChecks``); a second call replaces the first.

        Args:
            interval: measure gradient norms and dead units every ``interval``
                batches; ``base_interval`` when None.
            **thresholds: alert thresholds, as ``HealthChecks`` takes them.
        """
        checks = HealthChecks(self.file_folder, self._interval(interval), record=self.record,
                              **thresholds)
        self.callback_list = [c for c in self.callback_list if not isinstance(c, HealthChecks)]
        self.callback_list.append(checks)

    def register_layer_activations(self, exclude_layers=EXCLUDE_LAYERS, interval=None):
        self.callback_list.append(LayerActivations(
            self.file_folder, exclude_layers, self.custom_preprocess, self._interval(interval),
            self.visualization_inputs, self.record, self.history_limit))

    def register_saliency_maps(self, interval=None):
        self.callback_list.append(SaliencyMaps(
            self.file_folder, self.custom_preprocess, self.custom_postprocess,
            self._interval(interval), self.visualization_inputs, self.feature_names, self.record,
            self.history_limit))

    def register_deconvolutional_network(self, feat_map_layer_no, feat_map_amount=None,
                                         feat_map_nos=None, custom_keras_model_info=None,
                                         interval=None):
        self.callback_list.append(DeconvolutionalNetwork(
            self.file_folder, feat_map_layer_no, feat_map_amount, feat_map_nos,
            self.custom_preprocess, self.custom_postprocess, custom_keras_model_info,
            self._interval(interval), self.visualization_inputs, self.record,
            self.history_limit))

    def register_deep_visualization(self, units_to_visualize, learning_rate, no_of_iterations,
                                    l2_decay=0, blur_interval=0, blur_std=0, value_percentile=0,
                                    norm_percentile=0, contribution_percentile=0,
                                    abs_contribution_percentile=0, interval=None):
        self.callback_list.append(DeepVisualization(
            self.file_folder, units_to_visualize, learning_rate, no_of_iterations, l2_decay,
            blur_interval, blur_std, value_percentile, norm_percentile, contribution_percentile,
            abs_contribution_percentile, self.custom_postprocess, self._interval(interval),
            self.visualization_inputs, self.record, self.history_limit))


def _register_method(technique):
    """``CustomCallbacks.register_<key>`` of a declared technique, with the declared
    parameters (defaults from its pure function) and ``interval=None``."""
    function = registry.load(technique.function)
    accepted = inspect.signature(function).parameters
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [accepted[name].replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
                   for name in technique.parameters]
    parameters.append(inspect.Parameter("interval", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        default=None))
    signature = inspect.Signature(parameters)
    name = "register_" + technique.key

    def register(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as error:
            raise TypeError("%s%s: %s" % (name, str(signature).replace("self, ", "", 1),
                                          error)) from None
        bound.apply_defaults()
        params = dict(bound.arguments)
        del params["self"]
        interval = params.pop("interval")
        self.callback_list.append(registry.load(technique.callback)(
            self.file_folder, technique, self._interval(interval), params, **self.settings()))

    register.__name__ = register.__qualname__ = name
    register.__signature__ = signature
    register.__doc__ = """%s: %s

    %s %s

    Args: those of ``%s`` (%s); interval: compute every ``interval`` batches,
    ``base_interval`` when None. Results: ``results/%s``.
    """ % (technique.title, technique.explanation.shows, technique.explanation.reading,
           technique.explanation.misleads, technique.function.replace(":", "."),
           ", ".join(technique.parameters), technique.results_file)
    return register


# The Appendix C methods above stay as they are; every other declared technique gets its own.
for _technique in registry.TECHNIQUES:
    if _technique.function and not hasattr(CustomCallbacks, "register_" + _technique.key):
        setattr(CustomCallbacks, "register_" + _technique.key, _register_method(_technique))
del _technique
