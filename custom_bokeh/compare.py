"""Comparison dashboards: 2 to 4 runs of one user side by side, live.

``/compare_training_progress`` overlays every metric of the compared runs on a
common epoch axis (one colour per run, the run's label in the legend, its
validation values as markers of the same colour). ``/compare_images`` shows one
snapshot technique's panel per run, drawn by that technique's own ``render``,
under one shared stage slider over the training steps of every run's snapshots:
each panel shows its run's newest snapshot at or before the chosen step, with
that snapshot's true step, epoch and batch; one image choice serves all panels.
Both open only with a comparison token (``auth.embed_compare_script``) whose
every run folder belongs to its user. Each run is read by a ``LiveDashboard``
(the same safe readers and caps as the one-run dashboards), all polled together
until every run has ended. This module imports no keras.
"""

from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, DataRange1d, Div, HoverTool, Select, Slider
from bokeh.plotting import figure

from custom_bokeh.auth import (COMPARE_CURVES_APP, COMPARE_IMAGES_APP, RUN_COLORS, InvalidToken,
                               verify_compare_token)
from custom_bokeh.dashboard import (MAX_HISTORY_ENTRIES, POLL_MS, ImageDashboard, LiveDashboard,
                                    NoDataMessage, RunApplication, message_div, open_run,
                                    show_message)
from custom_bokeh.training_progress import POSITION_COLUMNS, TOOLS, TableReader
from custom_keras import registry, storage

CURVES_TECHNIQUE = registry.get("training_progress")
_HEADING_STYLES = {"font-size": "15px", "font-weight": "700", "padding": "2px 0"}


class CompareApplication(RunApplication):
    """A comparison app: opens a session only for a comparison token minted for it.

    Args (as ``RunApplication``'s):
        make_document: the app's ``make_document(doc)``.
        storage_dir: the folder that holds every user's runs.
        secret_key: the secret key the server signs sessions with.
        technique_key: the app, ``auth.COMPARE_CURVES_APP`` or ``auth.COMPARE_IMAGES_APP``
            (its path); a token minted for another app is refused.
    """

    def verify(self, token):
        """The ``auth.CompareGrant`` of ``token``, else ``InvalidToken``."""
        grant = verify_compare_token(token, self.secret_key, self.storage_dir, self.technique_key)
        if self.technique_key == COMPARE_IMAGES_APP and registry.get(
                grant.technique_key) not in registry.SNAPSHOT_TECHNIQUES:
            raise InvalidToken("the session token names no snapshot technique")
        return grant


def make_applications(storage_dir, secret_key):
    """{"/<app>": application} of the comparison apps, for the Bokeh server."""
    return {"/" + COMPARE_CURVES_APP: CompareApplication(
                make_curves_document, storage_dir, secret_key, COMPARE_CURVES_APP),
            "/" + COMPARE_IMAGES_APP: CompareApplication(
                make_images_document, storage_dir, secret_key, COMPARE_IMAGES_APP)}


class ComparedRuns:
    """The ``LiveDashboard`` of every compared run, polled together until all have ended.

    A subclass sets ``self.parts`` (one dashboard per run, in the page's order) and
    ``self.layout``, and implements ``after_update()``, which draws what the parts read.
    """

    parts = ()

    def __init__(self):
        self._doc = self._poll_callback = None

    @property
    def ended(self):
        return all(part.ended for part in self.parts)

    def attach(self, doc):
        """Adds the page to ``doc`` and polls until every run has ended."""
        self._doc = doc
        doc.add_root(self.layout)
        if not self.ended:
            self._poll_callback = doc.add_periodic_callback(self.update, POLL_MS)

    def update(self):
        for part in self.parts:
            part.update()
        self.after_update()
        if self.ended and self._poll_callback is not None:
            self._doc.remove_periodic_callback(self._poll_callback)
            self._poll_callback = None

    def after_update(self):
        raise NotImplementedError


class RunCurves(LiveDashboard):
    """One compared run's training tables, streamed into ``batch_source`` and ``val_source``.

    Args:
        run_dir: the run folder.
        label: the run's name on the page (script, run number, date).
    """

    def __init__(self, run_dir, label):
        super().__init__(run_dir)
        self.label = label
        self._no_data = NoDataMessage(CURVES_TECHNIQUE, run_dir)
        self.batches = TableReader(run_dir, storage.TRAINING_PROGRESS_TABLE,
                                   storage.TRAINING_PROGRESS_FILE, ("progress", "accuracy", "loss"))
        self.validation = TableReader(run_dir, storage.TRAINING_PROGRESS_VAL_TABLE,
                                      storage.TRAINING_PROGRESS_VAL_FILE,
                                      ("epoch", "val_accuracy", "val_loss"))
        self.batch_source = ColumnDataSource(data={})
        self.val_source = ColumnDataSource(data={})
        self.problem = ""
        self.layout = self.alerts.div
        self.update()

    @property
    def metrics(self):
        """The run's metrics per batch (running averages left out), in the table's order."""
        return [name for name in self.batch_source.data
                if name not in POSITION_COLUMNS and not name.endswith("_avg")]

    def read_new(self):
        try:
            self._read(self.batches, self.batch_source)
            self._read(self.validation, self.val_source)
            problems = [reader.problem() for reader in (self.batches, self.validation)]
        except (OSError, ValueError) as error:  # a link, a named pipe, a huge line or header
            problems = ["Could not read the training progress: %s" % error]
        self.problem = "\n".join(p for p in problems if p)

    @staticmethod
    def _read(reader, source):
        columns, new_rows, restarted = reader.read()
        if columns or restarted:
            source.data = {name: [] for name in columns or ()}
        if new_rows and all(name in new_rows for name in source.data):
            source.stream({name: new_rows[name] for name in source.data})

    def notice(self):
        """Why this run's curves are missing or incomplete, or ""."""
        return self.problem or ("" if self.metrics else self._no_data.text())


class CompareCurves(ComparedRuns):
    """Every metric of the compared runs overlaid, one figure per metric, live.

    Args:
        runs: [(run folder, label), ...] in the page's order.

    ``layout`` is the page; a figure has one line per run that logs its metric,
    named by the run's label, and the run's validation values as markers.
    """

    def __init__(self, runs):
        super().__init__()
        self.parts = [RunCurves(run_dir, label) for run_dir, label in runs]
        self.x_range = DataRange1d()  # shared: pan and zoom move every plot along the epochs
        self.message = message_div()
        self.content = column(Div(visible=False), sizing_mode="stretch_width")
        self.layout = column(self.message, self.content, sizing_mode="stretch_width")
        self._drawn = None
        self.after_update()

    def after_update(self):
        notices = ["%s: %s" % (run.label, run.notice()) for run in self.parts if run.notice()]
        show_message(self.message, "\n".join(notices),
                     error=any(run.problem for run in self.parts))
        drawn = [(tuple(run.metrics), tuple(run.val_source.data)) for run in self.parts]
        if drawn != self._drawn:  # a run's tables started (or restarted): draw again
            self._drawn = drawn
            figures = [self.metric_figure(metric) for metric in self.metrics()]
            self.content.children = figures or [Div(visible=False)]

    def metrics(self):
        """Every run's metrics once: accuracy and loss first, then the others in table order."""
        names = []
        for run in self.parts:
            names += [name for name in run.metrics if name not in names]
        main = [name for name in ("accuracy", "loss") if name in names]
        return main + [name for name in names if name not in main]

    def metric_figure(self, metric):
        """One metric of every run that logs it: a line per run, validation as markers."""
        fig = figure(title=metric.replace("_", " "), height=340, sizing_mode="stretch_width",
                     tools=TOOLS, active_scroll="wheel_zoom", x_range=self.x_range,
                     x_axis_label="epoch", y_axis_label=metric, name="compare_" + metric)
        lines = []
        for color, run in zip(RUN_COLORS, self.parts):
            if metric not in run.batch_source.data:
                continue
            lines.append(fig.line("progress", metric, source=run.batch_source, color=color,
                                  line_width=1.5, legend_label=run.label))
            if "val_" + metric in run.val_source.data:
                fig.scatter("epoch", "val_" + metric, source=run.val_source, size=9, color=color,
                            line_color="white", legend_label=run.label)
        fig.add_tools(HoverTool(renderers=lines, tooltips=[
            ("epochs trained", "@progress{0.0000}"), (metric, "@{%s}{0.000000}" % metric)]))
        # above the frame, one row: run labels are long and would hide curves inside it
        legend = fig.legend[0]
        fig.center.remove(legend)
        fig.add_layout(legend, "above")
        legend.update(orientation="horizontal", click_policy="hide", label_text_font_size="12px")
        fig.toolbar.logo = None
        return fig


def step_of(entry):
    """The training step of a history entry, or None when it has no integer step."""
    step = entry.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def step_label(entry, position, count, shared_step=None):
    """E.g. "Step 120 · epoch 2, batch 10 (snapshot 5 of 12)", epochs counted from 1."""
    epoch = entry.get("epoch")
    text = "Step %s \u00b7 epoch %s, batch %s (snapshot %d of %d)" % (
        step_of(entry), epoch + 1 if isinstance(epoch, int) else epoch, entry.get("batch"),
        position + 1, count)
    if shared_step is not None and (step_of(entry) is None or step_of(entry) > shared_step):
        text += "\nNo snapshot at or before step %d: its first is shown." % shared_step
    return text


class ComparePanel(ImageDashboard):
    """One run's panel of a comparison: an ``ImageDashboard`` whose snapshot and image the
    comparison chooses (``show_step``), labelled with the snapshot's true step.

    Args:
        run_dir: the run folder.
        technique: the technique's ``registry.Technique``.
        render: the technique's ``render`` function.
        label: the run's name on the page.
        color: the run's colour (the same as its curves).
    """

    def __init__(self, run_dir, technique, render, label, color):
        self.run_label = label
        self.shared_step = None
        super().__init__(run_dir, technique, render)
        heading = Div(text=label, render_as_text=True,
                      styles=dict(_HEADING_STYLES, **{"border-bottom": "4px solid %s" % color}))
        # the panel's own slider, play button and image choice stay out of the page; the alerts
        # go below the images, so that the panels' images line up
        self.alerts.div.styles = dict(self.alerts.div.styles, **{"max-width": "520px"})
        self.layout = column(heading, self.message, self.label, self.content, self.alerts.div)

    def steps(self):
        return [step for step in map(step_of, self.entries) if step is not None]

    def history_key(self):
        """Changes when snapshots were added or thinned out (thinning happens as one is added)."""
        return (len(self.entries), self.entries[-1]["file"]) if self.entries else None

    def show_step(self, step):
        """Shows the newest snapshot at or before ``step`` (the first when none is)."""
        self.shared_step = step
        self.follow_latest = False
        at_or_before = [i for i, entry in enumerate(self.entries)
                        if step_of(entry) is not None and step_of(entry) <= step]
        index = at_or_before[-1] if at_or_before else 0
        if self.slider.value != index:
            self.slider.value = index  # shows it (ImageDashboard._on_slider)
        else:
            self.show()

    def snapshot_text(self, entry, position):
        return step_label(entry, position, len(self.entries), self.shared_step)


class CompareImages(ComparedRuns):
    """One snapshot technique of the compared runs side by side under one stage slider.

    Args:
        runs: [(run folder, label), ...] in the page's order.
        technique: the snapshot technique's ``registry.Technique``.
        render: its ``render(result, info, input_image, image_name)``.

    The slider runs over every training step at which any run took a snapshot;
    at its end it follows the newest snapshots as they arrive.
    """

    def __init__(self, runs, technique, render):
        super().__init__()
        self.parts = [ComparePanel(run_dir, technique, render, label, color)
                      for (run_dir, label), color in zip(runs, RUN_COLORS)]
        self.steps = []
        self.follow_latest = True
        self._moving = False
        self._history_key = None
        self.step_text = Div(text="", render_as_text=True, name="shared_step",
                             styles={"font-size": "15px", "font-weight": "600"})
        self.slider = Slider(start=0, end=1, value=0, step=1, title="", show_value=False,
                             width=480, visible=False, name="shared_stage_slider")
        self.image_select = Select(title="Image", options=[], width=220, visible=False)
        self.layout = column(self.step_text, row(self.slider, self.image_select),
                             row(*[panel.layout for panel in self.parts]))
        self.slider.on_change("value", self._on_slider)
        self.image_select.on_change("value", lambda attr, old, new: self.move_panels())
        self.after_update()

    def update(self):
        for panel in self.parts:
            panel.follow_latest = False  # new snapshots must not move a panel: the slider does
        super().update()

    def after_update(self):
        """Follows new and thinned snapshots: the slider's steps, the image choice, the panels."""
        key = [panel.history_key() for panel in self.parts]
        if key == self._history_key:
            return  # nothing new: each panel has redrawn itself if its files changed
        self._history_key = key
        steps = sorted({step for panel in self.parts for step in panel.steps()})
        steps = steps[:MAX_HISTORY_ENTRIES]
        if steps != self.steps:
            shown = self.shown_step()
            self.steps = steps
            self._moving = True  # the slider is set here; its callback must not move panels
            try:
                self.slider.update(end=max(len(steps) - 1, 1), visible=len(steps) > 1)
                if self.follow_latest or shown is None:
                    self.slider.value = max(len(steps) - 1, 0)
                else:
                    self.slider.value = max(
                        [i for i, step in enumerate(steps) if step <= shown] or [0])
            finally:
                self._moving = False
        names = []
        for panel in self.parts:
            names += [name for name in panel.image_select.options if name not in names]
        self.image_select.update(options=names, visible=len(names) > 1)
        if names and self.image_select.value not in names:
            first = self.parts[0].image_select.value  # the first run's newest image
            self.image_select.value = first if first in names else names[-1]  # moves the panels
        else:
            self.move_panels()

    def shown_step(self):
        """The training step the slider is on, or None before any snapshot."""
        if not self.steps:
            return None
        return self.steps[min(int(self.slider.value), len(self.steps) - 1)]

    def move_panels(self):
        """Every panel to the chosen image and its snapshot at or before the chosen step."""
        step = self.shown_step()
        if step is None:
            self.step_text.text = ""
            return
        self.step_text.text = "Training step %d (%d of %d steps with snapshots)%s" % (
            step, self.steps.index(step) + 1, len(self.steps),
            " \u00b7 following the newest" if self.follow_latest else "")
        for panel in self.parts:
            if self.image_select.value in panel.image_select.options:
                panel.image_select.value = self.image_select.value
            panel.show_step(step)

    def _on_slider(self, attr, old, new):
        if self._moving:
            return
        self.follow_latest = new >= len(self.steps) - 1
        self.move_panels()


def make_curves_document(doc):
    """The overlaid training curves app of the Bokeh server."""
    doc.title = "Compare runs: training progress"
    grant = open_run(doc)
    if grant is not None:
        CompareCurves(list(zip(grant.run_dirs, grant.labels))).attach(doc)


def make_images_document(doc):
    """The side-by-side snapshots app of the Bokeh server."""
    grant = open_run(doc)
    if grant is not None:
        technique = registry.get(grant.technique_key)
        doc.title = "Compare runs: %s" % technique.title
        render = registry.load(technique.render)
        CompareImages(list(zip(grant.run_dirs, grant.labels)), technique, render).attach(doc)
