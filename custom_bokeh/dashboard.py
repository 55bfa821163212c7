"""The live machinery that every technique dashboard shares.

``open_run`` checks the signed session token and finds the run folder;
``image_dashboard`` turns a ``render`` function of one snapshot technique into
a live page: a slider over the snapshot history (following the newest by
default), a play button, an image choice, and a periodic callback that reads
only new history lines, redraws only when a file changed and stops once the
run has ended. Without results a dashboard says what is true (``no_data_text``:
waiting for the first snapshot, switched off and why, the run failed and with
which exception, or not registered and the call to add), read from
``results/techniques.json``, ``status.json`` and the output's traceback. Run
folders are hostile input: every file is read through
``custom_keras.storage``'s safe readers (no links, regular files, capped sizes)
with the restricted unpickler, a snapshot is drawn only within the drawing caps
below, and whatever is refused is reported on the page, never executed. This
module imports no keras.
"""
import pickle

import numpy as np
from bokeh.application import Application
from bokeh.application.handlers import FunctionHandler
from bokeh.layouts import column, row
from bokeh.model import Model
from bokeh.models import Div, Range, Select, Slider, Toggle
from tornado.web import HTTPError

from custom_bokeh.auth import InvalidToken, verify_token
from custom_keras import registry, storage

POLL_MS = 250
PLAY_MS = 600

# Caps on what one dashboard draws (results are written by user code); over a cap the
# dashboard says so instead of drawing.
MAX_DRAWN_VALUES = 8 * 1024 * 1024  # array values of one snapshot of one image, input included
MAX_DRAWN_ARRAYS = 256              # arrays (layers, reconstructions, units) in one snapshot
MAX_DRAWN_TEXT = 64 * 1024          # characters of names and labels in one snapshot
MAX_DRAWN_MAPS = 16_384             # feature maps and units of one snapshot, each with a hover
MAX_DRAWN_ITEMS = 100_000           # containers and values of one snapshot, walked to count
MAX_HISTORY_ENTRIES = 100_000       # snapshots on the slider
MAX_IMAGE_CHOICES = 100             # images in the image choice
_MESSAGE_STYLES = {"font-size": "14px", "padding": "8px 12px", "border-radius": "4px",
                   "background-color": "#f4f6f8", "color": "#222", "white-space": "pre-wrap"}
_ERROR_STYLES = dict(_MESSAGE_STYLES, **{"background-color": "#fdecea", "color": "#8a1c12"})


class RunApplication(Application):
    """A technique app that opens a session only for a valid run token minted for it.

    Args:
        make_document: the app's ``make_document(doc)``.
        storage_dir: the folder that holds every user's runs.
        secret_key: the secret key the server signs sessions with.
        technique_key: the technique this app shows (its path is ``/<technique_key>``);
            a token minted for another technique is refused.
    """

    def __init__(self, make_document, storage_dir, secret_key, technique_key):
        super().__init__(FunctionHandler(make_document))
        self.storage_dir = storage_dir
        self.secret_key = secret_key
        self.technique_key = technique_key

    def process_request(self, request):
        """Refuses (403) a session whose token is expired or names a run it may not open."""
        token = request.headers.get("Bokeh-Session-Id") or request.query_arguments.get(
            "bokeh-session-id", [b""])[0].decode("utf-8", "replace")
        try:
            self.verify(token)
        except InvalidToken as error:
            raise HTTPError(403, reason=str(error))
        return super().process_request(request)

    def verify(self, token):
        """What ``token`` grants this app (the run folder), else ``InvalidToken``."""
        return verify_token(token, self.secret_key, self.storage_dir, self.technique_key)


def open_run(doc):
    """The run folder this session may show (what its app's ``verify`` grants), or None
    after putting the reason on the page.

    The session id is the token that ``auth.embed_script`` signed; it is checked
    again here (signature, expiry, owner, inside the storage folder, minted for
    this app's technique) so that no path into a session skips the check.

    Args:
        doc: the session's document.
    """
    context = doc.session_context
    server_context = getattr(context, "server_context", None)
    application_context = getattr(server_context, "application_context", None)
    application = getattr(application_context, "application", None)
    if not isinstance(application, RunApplication):
        doc.add_root(message_div("This dashboard opens only from a file page of the visualizer.",
                                 error=True))
        return None
    try:
        return application.verify(context.id)
    except InvalidToken as error:
        doc.add_root(message_div("Access refused: %s." % error, error=True))
        return None


def message_div(text="", error=False):
    """A text box for notices; text is shown as text, never as HTML."""
    return Div(text=text, render_as_text=True, visible=bool(text),
               styles=_ERROR_STYLES if error else _MESSAGE_STYLES)


def show_message(div, text, error=False):
    div.text = text
    div.styles = _ERROR_STYLES if error else _MESSAGE_STYLES
    div.visible = bool(text)


MAX_BANNER_ALERTS = 3   # latest alerts named in the banner; Overview lists them all
_ALERT_STYLES = dict(_ERROR_STYLES, **{"border-left": "4px solid #c0392b"})


def alert_line(alert):
    """E.g. "Epoch 2, batch 30 · exploding gradients: <message> Try: <advice>"."""
    epoch = alert.get("epoch")
    where = "Epoch %s, batch %s" % (epoch + 1 if isinstance(epoch, int) else epoch,
                                    alert.get("batch"))
    text = "%s \u00b7 %s: %s" % (where, alert["kind"].replace("_", " "), alert["message"])
    return text + (" Try: %s" % alert["advice"] if alert["advice"] else "")


class AlertBanner:
    """A banner above a dashboard with the run's latest health-check alerts, as text.

    Args:
        run_dir: the run folder.

    ``div`` is the banner, hidden while there are no alerts; ``update()`` reads
    ``alerts.jsonl`` again only when its size or modification time changed.
    """

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.div = Div(text="", render_as_text=True, visible=False, styles=_ALERT_STYLES,
                       name="alert_banner")
        self._key = None
        self.update()

    def update(self):
        path = storage.results_path(self.run_dir, storage.ALERTS_FILE)
        key = (storage.file_mtime(path), storage.file_size(path))
        if key == self._key:
            return
        self._key = key
        alerts, problem = storage.read_alerts(self.run_dir)
        lines = []
        if alerts:
            lines.append("%d alert%s from the health checks%s:" % (
                len(alerts), "" if len(alerts) == 1 else "s",
                "" if len(alerts) <= MAX_BANNER_ALERTS else
                " (the latest %d here, all on the Overview tab)" % MAX_BANNER_ALERTS))
            lines += [alert_line(alert) for alert in reversed(alerts[-MAX_BANNER_ALERTS:])]
        if problem:
            lines.append(problem)
        self.div.text = "\n".join(lines)
        self.div.visible = bool(lines)


class TooMuchToDraw(ValueError):
    """A snapshot holds more than the dashboards draw (``MAX_DRAWN_*``)."""


def check_drawable(*values):
    """Raises ``TooMuchToDraw`` when ``values`` hold more than the drawing caps.

    Walks lists, tuples, sets and dicts without recursion and stops after
    ``MAX_DRAWN_ITEMS``, so a deep or self-referencing structure costs no more.
    """
    pending, items, arrays, array_values, text = list(values), 0, 0, 0, 0
    while pending:
        value = pending.pop()
        items += 1
        if isinstance(value, np.ndarray):
            arrays, array_values = arrays + 1, array_values + value.size
        elif isinstance(value, (str, bytes)):
            text += len(value)
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            pending.extend(value)
        if items > MAX_DRAWN_ITEMS:
            raise TooMuchToDraw("it holds more than %d values and containers" % MAX_DRAWN_ITEMS)
    for count, cap, what in ((array_values, MAX_DRAWN_VALUES, "array values"),
                             (arrays, MAX_DRAWN_ARRAYS, "arrays"),
                             (text, MAX_DRAWN_TEXT, "characters of text")):
        if count > cap:
            raise TooMuchToDraw("it holds %d %s; the dashboards draw at most %d"
                                % (count, what, cap))


def run_has_ended(run_dir):
    """True once the web app's runner has recorded that the run finished, failed or stopped."""
    status = storage.read_run_status(run_dir)
    return bool(status) and status.get("state") in storage.RUN_ENDED_STATES


def no_data_text(technique, run_dir):
    """What is true about a technique that has no results in this run yet, in words.

    Built from ``results/techniques.json`` (what the script registered and what
    became of it), ``status.json`` (the run's state) and, for a failed run, the
    exception at the end of ``output.txt``.

    Args:
        technique: the technique's ``registry.Technique``.
        run_dir: the run folder.
    """
    techniques = storage.read_techniques(run_dir)
    entry = (techniques or {}).get(technique.key)
    status = storage.read_run_status(run_dir) or {}
    state = status.get("state")
    title = technique.title.lower()
    if entry and entry.get("state") == storage.TECHNIQUE_SWITCHED_OFF:
        return switched_off_text(entry)
    if state == storage.RUN_FAILED and (entry or techniques is None):
        return "The run failed before the %s produced results: %s" % (
            title, failure_text(run_dir, status))
    if entry is None and (techniques is not None or state in storage.RUN_ENDED_STATES):
        return "Not registered: this run's script does not register the %s. Add:\n%s" % (
            title, register_call(technique, run_dir, techniques))
    if state == storage.RUN_STOPPED:
        return "The run was stopped before the %s produced results." % title
    if state in storage.RUN_ENDED_STATES:
        return "The run finished without %s results." % title
    if entry is None:
        return ("Waiting for the script to start: it has not registered any technique yet "
                "(loading TensorFlow takes a few seconds).")
    return waiting_text(entry)


class NoDataMessage:
    """``no_data_text`` of one technique and run, worked out again only when its files changed.

    Dashboards poll every ``POLL_MS``; the text depends on techniques.json,
    status.json and the layer activations (for the register call), so their
    modification times decide whether to read them again.

    Args:
        technique: the technique's ``registry.Technique``.
        run_dir: the run folder.
    """

    def __init__(self, technique, run_dir):
        self.technique, self.run_dir = technique, run_dir
        self._key = self._text = None

    def text(self):
        key = tuple(storage.file_mtime(path) for path in (
            storage.results_path(self.run_dir, storage.TECHNIQUES_FILE),
            storage.status_path(self.run_dir),
            storage.results_path(self.run_dir, registry.get("layer_activations").results_file)))
        if key != self._key:
            self._key, self._text = key, no_data_text(self.technique, self.run_dir)
        return self._text


def switched_off_text(entry):
    return "Switched off for this run: %s\nTraining went on without it." % (
        entry.get("reason") or "no reason recorded")


def failure_text(run_dir, status):
    """The exception that ended a failed run (the last line of its traceback), else its message."""
    failure = storage.read_failure(run_dir)
    if failure and failure[1]:
        return failure[1]
    return status.get("message") or "no exception recorded in the output"


def waiting_text(entry):
    """E.g. "Waiting for the first snapshot at batch 1 (then every 10 batches)"."""
    state, step = entry.get("state"), entry.get("first_snapshot_step")
    if state == storage.TECHNIQUE_REGISTERED or not isinstance(step, int):
        text = "Registered; the first snapshot is taken when training begins."
    else:
        text = "Waiting for the first snapshot at batch %d" % step
        interval = entry.get("interval")
        text += " (then every %d batches)." % interval if isinstance(interval, int) else "."
    if state == storage.TECHNIQUE_WAITING and entry.get("reason"):
        text += "\n%s" % entry["reason"]
    return text


def register_call(technique, run_dir, techniques):
    """The register call to add, with this model's own layer numbers when they are known.

    The layer numbers come from this run's layer activations ("Layer <no>: <name>"
    with each layer's output shape); without them the registry's example call.
    """
    layers = _known_layers(run_dir)
    kinds = {entry.get("input_kind") for entry in (techniques or {}).values()}
    images = "image" in kinds or not kinds - {None}
    if technique.key == "deconvolutional_network":
        convolutions = [(no, shape) for no, name, shape in layers
                        if len(shape) in (2, 3) and "conv" in name]
        if convolutions:
            no, shape = convolutions[-1]
            return "callbacks.register_deconvolutional_network(%d, feat_map_amount=%d)" % (
                no, min(8, shape[0]))
    if technique.key == "deep_visualization" and layers:
        no, _, shape = layers[-1]
        units = ", ".join("(%d, %d)" % (no, unit) for unit in range(min(2, shape[0])))
        settings = ("learning_rate=200, no_of_iterations=50, l2_decay=0.0001, blur_interval=4, "
                    "blur_std=1.0" if images else
                    "learning_rate=0.5, no_of_iterations=30, l2_decay=0.01")
        return "callbacks.register_deep_visualization([%s], %s)" % (units, settings)
    return technique.register_call


def _known_layers(run_dir):
    """[(layer no, layer name, output shape), ...] from the latest layer activations, or []."""
    try:
        result = storage.read_latest(run_dir, registry.get("layer_activations").results_file)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError):
        return []
    layers = []
    for entry in result if isinstance(result, (list, tuple)) else ():
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str):
            number, _, name = entry[0].partition(": ")
            if number.startswith("Layer ") and number[6:].isdigit():
                layers.append((int(number[6:]), name, np.shape(entry[1])))
    return layers


def snapshot_label(entry, position, count):
    """E.g. "Snapshot 4 of 11 · epoch 1, batch 30" (epochs counted from 1, as Keras prints).

    The snapshot number counts from 1 like the slider's positions; the stage
    (counted from 0 in the results files) is not shown beside it.
    """
    epoch = entry.get("epoch")
    return "Snapshot %d of %d \u00b7 epoch %s, batch %s" % (
        position + 1, count, epoch + 1 if isinstance(epoch, int) else epoch, entry.get("batch"))


def image_dashboard(doc, technique, render=None, one_result_for_every_input=None):
    """Fills ``doc`` with the live dashboard of a snapshot technique.

    Args:
        doc: the session's document.
        technique: the technique's ``registry.Technique``.
        render: ``render(result, info, input_image, image_name)`` returning the
            Bokeh layout of one snapshot for one image; None: the declared one.
        one_result_for_every_input: True when the result does not depend on the
            visualization input (deep visualization): no input choice is shown;
            None: as declared.
    """
    doc.title = technique.title
    run_dir = open_run(doc)
    if run_dir is not None:
        ImageDashboard(run_dir, technique, render or registry.load(technique.render),
                       technique.one_result_for_every_input if one_result_for_every_input is None
                       else one_result_for_every_input).attach(doc)


def document_function(technique):
    """The technique's ``make_document(doc)``: its declared one, else its ``render`` in
    ``image_dashboard``. Imports the declared module now."""
    if technique.make_document is not None:
        return registry.load(technique.make_document)
    render = registry.load(technique.render)

    def make_document(doc):
        image_dashboard(doc, technique, render)
    make_document.__name__ = "make_document_" + technique.key
    return make_document


def layout_signature(layout):
    """How a layout is built: its models' types and settings, without content or pan/zoom.

    Two layouts with the same signature differ only in images and texts, so the
    shown one can take the other's content (``copy_content``): the browser then
    redraws pixels instead of building new views, which shows a new snapshot
    sooner and keeps the user's pan and zoom.
    """
    return [(type(model), _settings(model)) for model in _models_in_order(layout)]


def copy_content(shown, new):
    """Copies data and texts of layout ``new`` into ``shown`` (both of the same signature)."""
    for shown_model, new_model in zip(_models_in_order(shown), _models_in_order(new)):
        for name in _CONTENT_PROPERTIES & shown_model.properties():
            value = getattr(new_model, name)
            setattr(shown_model, name, dict(value) if name == "data" else value)


def _same(a, b):
    try:
        return bool(a == b)
    except ValueError:  # e.g. numpy arrays in a setting: count them as different
        return False


# What a snapshot changes (copied by copy_content), and what the user changes in the
# browser (pan and zoom: a range's start and end, kept); neither counts as a difference
# in how a layout is built.
_CONTENT_PROPERTIES = {"data", "text"}
_VIEW_PROPERTIES = {"start", "end"}


def _models_in_order(model):
    """Every Bokeh model reachable from ``model``, in an order that depends only on the layout."""
    seen, order = set(), []

    def visit(value):
        if isinstance(value, Model):
            if value.id not in seen:
                seen.add(value.id)
                order.append(value)
                for name in sorted(value.properties_with_refs()):
                    visit(getattr(value, name))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(model)
    return order


def _settings(model):
    """The model's own non-default values, without references, content or view state."""
    skip = set(model.properties_with_refs()) | _CONTENT_PROPERTIES
    if isinstance(model, Range):
        skip |= _VIEW_PROPERTIES
    values = model.properties_with_values(include_defaults=False)
    return {name: value for name, value in values.items() if name not in skip}


def read_image_snapshot(run_dir, results_file, entry):
    """One snapshot of a history: ``{"images": {name: result}, ...}`` (ValueError if not)."""
    snapshot = storage.read_snapshot(run_dir, results_file, entry)
    if not (isinstance(snapshot, dict) and isinstance(snapshot.get("images"), dict)):
        raise ValueError("a snapshot must be a dict with a dict of images")
    return snapshot


def stage_controls():
    """(caption, stage slider, image choice) of a page over a snapshot history.

    The caption names the stage shown; the slider's own title stays empty, since Bokeh
    shows a title as "title: value" and a snapshot index means nothing to the user.
    """
    caption = Div(text="", render_as_text=True, styles={"font-size": "14px", "font-weight": "600"})
    slider = Slider(start=0, end=1, value=0, step=1, title="", show_value=False, width=360,
                    visible=False)
    image_select = Select(title="Image", options=[], width=220, visible=False)
    return caption, slider, image_select


def drawable_results(snapshot):
    """The snapshot with every result over a drawing cap replaced by the reason (an error)."""
    for name, result in snapshot["images"].items():
        try:
            check_drawable(result)
        except TooMuchToDraw as error:  # kept as the reason, not as the result
            snapshot["images"][name] = error.with_traceback(None)
    return snapshot


class SnapshotCache:
    """The last snapshot of one technique's history that a dashboard read.

    Read again only when its file changed; a read that failed is kept too and raised
    again, so a broken file is not read at every poll.

    Args:
        run_dir: the run folder.
        results_file: the technique's results file (names its history).
        prepare: optional function applied to a snapshot once it is read.
    """

    def __init__(self, run_dir, results_file, prepare=None):
        self.run_dir, self.results_file, self.prepare = run_dir, results_file, prepare
        self._cached = (None, None, None)  # (path and mtime, snapshot, error)

    def read(self, entry):
        """(path and mtime, snapshot) of a history entry; raises what reading it raised."""
        path = storage.snapshot_path(self.run_dir, self.results_file, entry)
        key = (path, storage.file_mtime(path))
        if self._cached[0] != key:
            try:
                snapshot = read_image_snapshot(self.run_dir, self.results_file, entry)
                if self.prepare is not None:
                    snapshot = self.prepare(snapshot)
                self._cached = (key, snapshot, None)
            except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
                self._cached = (key, None, error.with_traceback(None))
        if self._cached[2] is not None:
            # without its last traceback, which holds the frames (and data) of the last raise
            raise self._cached[2].with_traceback(None)
        return key, self._cached[1]


def offer_images(dashboard, names, hidden=False):
    """Offers ``names`` in ``dashboard.image_select`` and returns the chosen one (or None).

    The user's choice stays while it is offered, else the run's newest visualization image
    (or the last name) is chosen; ``dashboard.choosing_image`` is True meanwhile, so that the
    Select's own change callback does not draw again.
    """
    names = [name for name in names if isinstance(name, str)][:MAX_IMAGE_CHOICES]
    if not names:
        return None
    select = dashboard.image_select
    dashboard.choosing_image = True
    try:
        images = all(name.lower().endswith(storage.IMAGE_EXTENSIONS) for name in names)
        select.update(options=names, title="Image" if images else "Input",
                      visible=len(names) > 1 and not hidden)
        if select.value not in names:
            newest = [n for n in storage.list_images(dashboard.run_dir) if n in names]
            select.value = newest[-1] if newest else names[-1]
    finally:
        dashboard.choosing_image = False
    return select.value


class LiveDashboard:
    """What every live dashboard of a run shares: the alert banner, and ``update`` called
    every ``POLL_MS`` until the run has ended.

    Args:
        run_dir: the run folder.

    A subclass builds ``self.layout`` (with ``self.alerts.div`` in it) and implements
    ``read_new()``, which reads and shows what the run wrote since the last call.
    """

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.alerts = AlertBanner(run_dir)
        self._ended = False
        self._doc = self._poll_callback = None

    def attach(self, doc):
        """Adds the page to ``doc`` and starts polling unless the run has already ended."""
        self._doc = doc
        doc.add_root(self.layout)
        if not self._ended:
            self._poll_callback = doc.add_periodic_callback(self.update, POLL_MS)

    @property
    def ended(self):
        """True once the run had ended when ``update`` last looked."""
        return self._ended

    def update(self):
        """Reads what the run wrote since the last call; stops polling once the run has ended."""
        self._ended = run_has_ended(self.run_dir)  # read before the files: nothing is missed
        self.alerts.update()
        self.read_new()
        if self._ended and self._poll_callback is not None:
            self._doc.remove_periodic_callback(self._poll_callback)
            self._poll_callback = None

    def read_new(self):
        raise NotImplementedError


class ImageDashboard(LiveDashboard):
    """The live view of one snapshot technique in one run folder.

    Args:
        run_dir: the run folder.
        technique: the technique's ``registry.Technique``.
        render: ``render(result, info, input_image, image_name)`` -> Bokeh layout;
            ``input_image`` is the image as fed to the model (``input_images.pickle``),
            else the float input of a sequence or tabular model
            (``visualization_inputs.pickle``), else None.
        one_result_for_every_input: True hides the input choice (the result does
            not depend on the input).

    ``layout`` is the page; ``update()`` is the periodic callback (reads new
    history lines, redraws when something changed, stops once the run ended).
    """

    def __init__(self, run_dir, technique, render, one_result_for_every_input=False):
        super().__init__(run_dir)
        self.technique = technique
        self.render = render
        self.one_result_for_every_input = one_result_for_every_input
        self._no_data = NoDataMessage(technique, run_dir)
        self.entries = []
        self.follow_latest = True
        self._index_offset = 0
        self._shown_key = self._shown_signature = None
        self._snapshots = SnapshotCache(run_dir, technique.results_file, drawable_results)
        self.choosing_image = False
        self._input_images, self._input_images_mtime = ({}, None), None
        self._inputs, self._inputs_mtime = ({}, None), None
        self._index_problem = ""
        self._play_callback = None

        self.message = message_div()
        # the label names the shown snapshot (stage, epoch, batch, "snapshot 4 of 11")
        self.label, self.slider, self.image_select = stage_controls()
        self.play = Toggle(label="Play", width=80, visible=False)
        # an empty column draws nothing but makes Bokeh warn (EMPTY_LAYOUT): hold a placeholder
        self.content = column(Div(visible=False))
        self.layout = column(self.alerts.div, self.message, self.label,
                             row(self.slider, self.play, self.image_select), self.content)
        self.slider.on_change("value", self._on_slider)
        self.image_select.on_change("value", self._on_image)
        self.play.on_change("active", self._on_play)
        self.update()

    def read_new(self):
        """Reads new history entries and shows the newest when following."""
        if self._index_was_replaced():
            self.entries, self._index_offset, self._shown_key = [], 0, None
            self.follow_latest = True
        try:
            new_entries, removed = self._read_new_entries()
            self._index_problem = ""
        except (OSError, ValueError) as error:  # a link, a pipe, a huge line, not JSON
            new_entries, removed, self._index_problem = [], set(), (
                "Could not read the history of snapshots: %s" % error)
        if new_entries or removed:
            self._apply_history_changes(new_entries, removed)
        self.show()

    def _read_new_entries(self):
        """(history entries written since the last call, files thinned out of the history).

        At most ``MAX_HISTORY_ENTRIES`` entries are held in all.
        """
        room = MAX_HISTORY_ENTRIES - len(self.entries)
        if room <= 0:
            raise TooMuchToDraw("the slider holds the first %d snapshots; later ones are not "
                                "shown" % MAX_HISTORY_ENTRIES)
        entries, removed, self._index_offset = storage.read_history_changes(
            self.run_dir, self.technique.results_file, self._index_offset)
        return [entry for entry in entries
                if isinstance(entry, dict) and isinstance(entry.get("file"), str)][:room], removed

    def _apply_history_changes(self, new_entries, removed):
        """Drops thinned snapshots and adds new ones; the slider stays on the snapshot it
        showed when that one is still kept, else follows the newest or stays in range."""
        shown = (self.entries[min(int(self.slider.value), len(self.entries) - 1)]
                 if self.entries else None)
        self.entries = [entry for entry in self.entries if entry["file"] not in removed]
        self.entries.extend(new_entries)
        count = len(self.entries)
        self.slider.update(end=max(count - 1, 1), visible=count > 1)
        self.play.visible = count > 1
        if self.follow_latest:
            value = count - 1
        else:
            kept = [i for i, entry in enumerate(self.entries) if entry is shown]
            value = kept[0] if kept else min(int(self.slider.value), max(count - 1, 0))
        self.slider.value = value  # fires _on_slider only when the value changes

    def show(self):
        """Renders the chosen snapshot and image, unless exactly that is already shown."""
        if not self.entries:
            show_message(self.message, self._index_problem or
                         self._no_data.text(), error=bool(self._index_problem))
            return
        position = min(int(self.slider.value), len(self.entries) - 1)
        entry = self.entries[position]
        self.label.text = self.snapshot_text(entry, position)
        try:
            snapshot_key, snapshot = self._snapshots.read(entry)
            input_images = self._read_input_images()
            inputs = self._read_inputs()
        except (storage.UnsafePickleError, storage.UnsafeFileError) as error:
            self._shown_key = None
            show_message(self.message, "Refused to read a results file: %s" % error, error=True)
            return
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
            self._shown_key = None
            show_message(self.message, "Could not read %s: %s" % (entry["file"], error), error=True)
            return
        image_name = self._choose_image(list(snapshot["images"]))
        # techniques.json and status.json too: the notice above the results follows them
        key = (snapshot_key, image_name, self._input_images_mtime, self._inputs_mtime,
               storage.file_mtime(storage.results_path(self.run_dir, storage.TECHNIQUES_FILE)),
               storage.file_mtime(storage.status_path(self.run_dir)))
        if key == self._shown_key:
            return
        self._shown_key = key
        if image_name is None:
            show_message(self.message, "Snapshot %s holds no image results." % entry["file"],
                         error=True)
            return
        result = snapshot["images"][image_name]
        info = snapshot.get("info")
        info = info.get(image_name) if isinstance(info, dict) else None
        info = info if isinstance(info, dict) else {}
        input_image = input_images.get(image_name)
        if input_image is None:
            input_image = inputs.get(image_name)
        try:
            if isinstance(result, TooMuchToDraw):  # found when the snapshot was read
                raise result.with_traceback(None)
            check_drawable(result, info, input_image, image_name)
            layout = self.render(result, info, input_image, image_name)
        except TooMuchToDraw as error:
            show_message(self.message, "The %s of image %s is not drawn: %s." % (
                self.technique.title.lower(), image_name, error), error=True)
            return
        except Exception as error:  # results are written by user code: report, do not crash
            show_message(self.message, "Could not show the %s of image %s: %s: %s" % (
                self.technique.title.lower(), image_name, type(error).__name__, error), error=True)
            return
        show_message(self.message, self._index_problem or self._notice(), error=bool(self._index_problem))
        signature = layout_signature(layout)
        if self.content.children and _same(signature, self._shown_signature):
            copy_content(self.content.children[0], layout)
        else:
            self.content.children = [layout]
            self._shown_signature = signature

    def snapshot_text(self, entry, position):
        """The caption of the snapshot shown (``snapshot_label``)."""
        return snapshot_label(entry, position, len(self.entries))

    def _notice(self):
        """Shown above the results: why the snapshots stop (switched off, the run failed)."""
        entry = (storage.read_techniques(self.run_dir) or {}).get(self.technique.key)
        if entry and entry.get("state") == storage.TECHNIQUE_SWITCHED_OFF:
            return switched_off_text(entry) + " The snapshots taken before are shown."
        status = storage.read_run_status(self.run_dir) or {}
        if status.get("state") == storage.RUN_FAILED:
            return "The run failed: %s\nThe snapshots taken before are shown." % failure_text(
                self.run_dir, status)
        return ""

    def _choose_image(self, names):
        """The selected image if the snapshot has it, else the newest visualization image."""
        return offer_images(self, names, hidden=self.one_result_for_every_input)

    def _read_input_images(self):
        """{image name: array}, read again only when the file changed; errors are kept too."""
        mtime = storage.file_mtime(storage.results_path(self.run_dir, storage.INPUT_IMAGES_FILE))
        if mtime != self._input_images_mtime:
            self._input_images_mtime = mtime
            try:
                images = storage.read_input_images(self.run_dir)
                if not isinstance(images, dict):
                    raise ValueError("%s must hold a dict" % storage.INPUT_IMAGES_FILE)
                self._input_images = (images, None)
            except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
                self._input_images = ({}, error.with_traceback(None))
        if self._input_images[1] is not None:
            raise self._input_images[1].with_traceback(None)
        return self._input_images[0]

    def _read_inputs(self):
        """{input name: float array} of a sequence or tabular model, read again only when changed."""
        path = storage.results_path(self.run_dir, storage.VISUALIZATION_INPUTS_FILE)
        mtime = storage.file_mtime(path)
        if mtime != self._inputs_mtime:
            self._inputs_mtime = mtime
            try:
                inputs = storage.read_visualization_inputs(self.run_dir)
                if not isinstance(inputs, dict):
                    raise ValueError("%s must hold a dict" % storage.VISUALIZATION_INPUTS_FILE)
                self._inputs = (inputs, None)
            except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
                self._inputs = ({}, error.with_traceback(None))
        if self._inputs[1] is not None:
            raise self._inputs[1].with_traceback(None)
        return self._inputs[0]

    def _index_was_replaced(self):
        """True when the history index shrank (a re-run deleted the previous results)."""
        index = storage.history_index_path(self.run_dir, self.technique.results_file)
        return storage.file_size(index) < self._index_offset

    def _on_slider(self, attr, old, new):
        self.follow_latest = new >= len(self.entries) - 1
        self.show()

    def _on_image(self, attr, old, new):
        if not self.choosing_image:
            self.show()

    def _on_play(self, attr, old, playing):
        self.play.label = "Pause" if playing else "Play"
        if playing:
            if self.slider.value >= len(self.entries) - 1:
                self.slider.value = 0
            self._play_callback = self._doc.add_periodic_callback(self._step, PLAY_MS)
        elif self._play_callback is not None:
            self._doc.remove_periodic_callback(self._play_callback)
            self._play_callback = None

    def _step(self):
        if self.slider.value < len(self.entries) - 1:
            self.slider.value += 1
        else:
            self.play.active = False
