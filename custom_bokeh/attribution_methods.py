"""All attribution methods of a run side by side, for one image and one stage.

One small overlay per attribution method that has results (its map over the
input, colour bar, the class it explains and its probability), a note for each
method that is switched off, waiting or not registered, one image choice, one
stage slider over the union of the methods' histories and one opacity slider
for every overlay. At a stage each method shows its newest snapshot taken at or
before that step, captioned with its own step. Live like the other dashboards:
only new history lines are read, panels are redrawn only when what they show
changed (a new snapshot of the same shape is copied into the shown layout, so
zoom and opacity stay), and polling stops once the run has ended. This module
imports no keras.
"""
import bisect
import pickle

from bokeh.layouts import column, row
from bokeh.models import CustomJS, Div, ImageRGBA, Plot, Slider

from custom_bokeh import attribution, charts
from custom_bokeh.dashboard import (MAX_HISTORY_ENTRIES, LiveDashboard, SnapshotCache,
                                    TooMuchToDraw, _same, check_drawable, copy_content,
                                    failure_text, layout_signature, message_div, offer_images,
                                    open_run, show_message, stage_controls, switched_off_text,
                                    waiting_text)
from custom_keras import registry, storage

TECHNIQUE = registry.get("attribution_methods")
PANEL_COLUMNS = 4
PANEL_STYLES = {"font-size": "13px", "white-space": "pre-wrap", "max-width": "260px"}
# room for four caption lines, so that the maps of a row line up
CAPTION_STYLES = dict(PANEL_STYLES, **{"min-height": "76px"})
NOTE_STYLES = dict(CAPTION_STYLES, **{"color": "#8a1c12"})
PANEL_TITLE_STYLES = dict(PANEL_STYLES, **{"font-size": "14px", "font-weight": "600"})


def attribution_techniques():
    """The attribution techniques, in the registry's order."""
    return list(registry.ATTRIBUTION_TECHNIQUES)


def step_text(entry):
    """E.g. "step 120 (epoch 3, batch 20)", epochs counted from 1 as Keras prints them; a tag
    that is not a number (the index is written by user code) shows as "?"."""
    step, epoch, batch = (_integer(entry.get(tag)) for tag in ("step", "epoch", "batch"))
    return "step %s (epoch %s, batch %s)" % (
        "?" if step is None else step, "?" if epoch is None else epoch + 1,
        "?" if batch is None else batch)


def _integer(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _step(entry):
    return _integer(entry.get("step"))


class MethodHistory:
    """The snapshot history of one attribution technique, read incrementally.

    Args:
        run_dir: the run folder.
        technique: the technique's ``registry.Technique``.
    """

    def __init__(self, run_dir, technique):
        self.run_dir, self.technique = run_dir, technique
        self.entries, self.steps = [], []   # sorted by step
        self.problem = ""
        self._offset = 0
        self.snapshots = SnapshotCache(run_dir, technique.results_file)

    def read_new(self):
        """Reads new index lines; True when the history changed."""
        index = storage.history_index_path(self.run_dir, self.technique.results_file)
        replaced = storage.file_size(index) < self._offset  # a re-run deleted the old results
        if replaced:
            self.entries, self.steps, self._offset = [], [], 0
        try:
            entries, removed, self._offset = storage.read_history_changes(
                self.run_dir, self.technique.results_file, self._offset)
            self.problem = ""
        except (OSError, ValueError) as error:  # a link, a pipe, a huge line, not JSON
            self.problem = "Could not read its history: %s" % error
            return replaced
        entries = [e for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)
                   and _step(e) is not None]
        if not (entries or removed):
            return replaced
        kept = [e for e in self.entries if e["file"] not in removed] + entries
        self.entries = sorted(kept, key=_step)[:MAX_HISTORY_ENTRIES]
        self.steps = [_step(e) for e in self.entries]
        return True

    def at(self, step):
        """The newest entry taken at or before ``step``, or None."""
        position = bisect.bisect_right(self.steps, step)
        return self.entries[position - 1] if position else None


class AttributionMethodsDashboard(LiveDashboard):
    """Every attribution method of one run, side by side, for one image and one stage.

    Args:
        run_dir: the run folder.
        techniques: the attribution techniques (``attribution_techniques()``).

    ``layout`` is the page; ``update()`` is the periodic callback.
    """

    def __init__(self, run_dir, techniques):
        super().__init__(run_dir)
        self.histories = [MethodHistory(run_dir, t) for t in techniques]
        self.steps = []
        self.follow_latest = True
        self._shown_key = self._shown_signature = None
        self._inputs_key, self._inputs = None, ({}, None)
        self._techniques, self._failed = ("unread", {}), ("unread", "")
        self.choosing_image = False

        self.message = message_div()
        self.label, self.slider, self.image_select = stage_controls()
        self.opacity = Slider(start=0, end=1, step=0.05, value=attribution.DEFAULT_OPACITY,
                              title="Map opacity", width=220)
        self._opacity_callback = CustomJS(args={"overlays": []}, code=attribution.OPACITY_CODE)
        self.opacity.js_on_change("value", self._opacity_callback)
        self.notes = Div(text="", render_as_text=True, visible=False,
                         styles=dict(PANEL_STYLES, **{"max-width": "900px"}))
        self.content = column(Div(visible=False))
        self.layout = column(self.alerts.div, self.message, self.label,
                             row(self.slider, self.image_select, self.opacity),
                             self.content, self.notes)
        self.slider.on_change("value", self._on_slider)
        self.image_select.on_change("value", self._on_image)
        self.update()

    def read_new(self):
        changed = [history.read_new() for history in self.histories]
        if any(changed):
            shown = self.steps[min(int(self.slider.value), len(self.steps) - 1)] \
                if self.steps else None
            self.steps = sorted({step for h in self.histories for step in h.steps})
            count = len(self.steps)
            self.slider.update(end=max(count - 1, 1), visible=count > 1)
            if self.follow_latest or shown not in self.steps:
                value = count - 1 if self.follow_latest else bisect.bisect_right(
                    self.steps, shown) - 1
            else:
                value = self.steps.index(shown)
            self.slider.value = max(value, 0)  # fires _on_slider only when the value changes
        self.show()

    def show(self):
        """Draws every method at the chosen step and image, unless exactly that is shown."""
        techniques = self._read_techniques()
        failed = self._failure()
        if not self.steps:
            self.content.children = [Div(visible=False)]
            self._shown_key = None
            show_message(self.message, "\n".join(filter(None, [
                failed, self._no_results_text(techniques)])), error=bool(failed))
            self.notes.visible = False
            return
        step = self.steps[min(int(self.slider.value), len(self.steps) - 1)]
        self.label.text = "Stage %d of %d \u00b7 step %d" % (
            min(int(self.slider.value), len(self.steps) - 1) + 1, len(self.steps), step)
        shown = [(h, h.at(step)) for h in self.histories]
        snapshots, key = {}, [step, self.image_select.value]
        for history, entry in shown:
            if entry is None:
                continue
            try:
                snapshot_key, snapshots[history.technique.key] = history.snapshots.read(entry)
                key.append(snapshot_key)
            except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
                snapshots[history.technique.key] = error
        try:
            inputs = self._read_inputs()
            input_problem = ""
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
            inputs, input_problem = {}, "Could not read the input images: %s" % error
        image_name = self._choose_image(snapshots)
        key += [image_name, self._inputs_key, failed, tuple(sorted(
            (k, str(v.get("state")), str(v.get("reason"))) for k, v in techniques.items()))]
        if key == self._shown_key:
            return
        self._shown_key = key
        panels, overlays = [], []
        for history, entry in shown:
            if entry is not None:
                panel, overlay = self._panel(history, entry, snapshots[history.technique.key],
                                             image_name, inputs, techniques)
                panels.append(panel)
                overlays += [overlay] if overlay is not None else []
        problems = "\n".join(filter(None, [failed, input_problem]))
        show_message(self.message, problems, error=bool(problems))
        self.notes.text = self._notes_text(techniques, {h.technique.key for h, e in shown if e})
        self.notes.visible = bool(self.notes.text)
        self._show_panels(panels, overlays)

    def _show_panels(self, panels, overlays):
        """Shows the panels, copying them into the shown ones when only their content changed."""
        # charts of sequence or tabular inputs are wide: one a row
        charts_shown = any(not isinstance(plot.renderers[0].glyph, ImageRGBA)
                           for panel in panels for plot in panel.select({"type": Plot}))
        columns = 1 if charts_shown else PANEL_COLUMNS
        self.opacity.visible = bool(overlays)
        _link_equal_images(panels)
        layout = column(*[row(*panels[i:i + columns], spacing=16)
                          for i in range(0, len(panels), columns)], spacing=12)
        signature = layout_signature(layout)
        if self.content.children and _same(signature, self._shown_signature):
            copy_content(self.content.children[0], layout)  # zoom and opacity stay
            return
        for overlay in overlays:  # new glyphs start at the user's opacity
            overlay.glyph.global_alpha = self.opacity.value
        self._opacity_callback.args = {"overlays": [o.glyph for o in overlays]}
        self.content.children = [layout]
        self._shown_signature = signature

    def _panel(self, history, entry, snapshot, image_name, inputs, techniques):
        """(column of the method's name, caption and map, its overlay renderer or None)."""
        technique = history.technique
        name = Div(text=technique.title, render_as_text=True, styles=PANEL_TITLE_STYLES)
        lines = [step_text(entry)]
        state = techniques.get(technique.key, {})
        if state.get("state") == storage.TECHNIQUE_SWITCHED_OFF:
            lines.append("Switched off later: %s" % (state.get("reason") or "no reason recorded"))
        caption = Div(text="", render_as_text=True, styles=CAPTION_STYLES)
        try:
            if isinstance(snapshot, Exception):
                raise snapshot
            result = snapshot["images"].get(image_name)
            if result is None:
                raise ValueError("this snapshot holds no result for %s" % image_name)
            info = snapshot.get("info")
            info = info.get(image_name) if isinstance(info, dict) else None
            info = info if isinstance(info, dict) else {}
            input_image = inputs.get(image_name)
            check_drawable(result, info, input_image)
            attribution.check_result(result, input_image)
            lines.append(attribution.explains_text(info))
            caption.text = "\n".join(lines)
            if "values" in result:
                return column(name, caption, charts.result_figure(
                    result["values"], "Attribution", y_label="attribution",
                    feature_names=result.get("feature_names"))), None
            plot, overlay = attribution.overlay_figure(
                result["map"], bool(result["signed"]), input_image, "",
                attribution.PANEL_IMAGE_PIXELS)
            return column(name, caption, plot), overlay
        except (TooMuchToDraw, OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
            caption.text = "\n".join(lines + ["Not drawn: %s" % error])
        except Exception as error:  # results are written by user code: report, do not crash
            caption.text = "\n".join(lines + ["Not drawn: %s: %s" % (type(error).__name__, error)])
        caption.styles = NOTE_STYLES
        return column(name, caption), None

    def _notes_text(self, techniques, drawn):
        """One line per attribution method not drawn: switched off, waiting, not registered."""
        lines, unregistered = [], []
        for history in self.histories:
            technique = history.technique
            if history.problem:
                lines.append("%s: %s" % (technique.title, history.problem))
            if technique.key in drawn:
                continue
            entry = techniques.get(technique.key)
            if entry is None:
                unregistered.append(technique.title)
            elif entry.get("state") == storage.TECHNIQUE_SWITCHED_OFF:
                lines.append("%s: switched off: %s" % (
                    technique.title, entry.get("reason") or "no reason recorded"))
            elif not history.entries:
                lines.append("%s: %s" % (technique.title, waiting_text(entry)))
            else:
                lines.append("%s: no snapshot yet at this stage (the first is at %s)" % (
                    technique.title, step_text(history.entries[0])))
        if unregistered:
            lines.append("Not registered in this run: %s." % ", ".join(unregistered))
        return "\n".join(lines)

    def _no_results_text(self, techniques):
        registered = [h.technique for h in self.histories if h.technique.key in techniques]
        if not registered:
            return ("This run registers no attribution method. Add one or more of:\n%s" %
                    "\n".join(h.technique.register_call for h in self.histories))
        lines = []
        for technique in registered:
            entry = techniques[technique.key]
            lines.append("%s: %s" % (technique.title, switched_off_text(entry).split("\n")[0]
                                     if entry.get("state") == storage.TECHNIQUE_SWITCHED_OFF
                                     else waiting_text(entry)))
        return "\n".join(lines)

    def _choose_image(self, snapshots):
        """The selected image if a shown snapshot has it, else the newest visualization image."""
        names = []
        for snapshot in snapshots.values():
            if isinstance(snapshot, dict):
                names += [n for n in snapshot["images"] if n not in names]
        return offer_images(self, names)

    def _read_techniques(self):
        """{key: entry} of techniques.json, read again only when the file changed."""
        mtime = storage.file_mtime(storage.results_path(self.run_dir, storage.TECHNIQUES_FILE))
        if mtime != self._techniques[0]:
            self._techniques = (mtime, storage.read_techniques(self.run_dir) or {})
        return self._techniques[1]

    def _failure(self):
        """"The run failed: <exception>" once the run has failed, else ""."""
        mtime = storage.file_mtime(storage.status_path(self.run_dir))
        if mtime != self._failed[0]:
            status = storage.read_run_status(self.run_dir) or {}
            self._failed = (mtime, "The run failed: %s" % failure_text(self.run_dir, status)
                            if status.get("state") == storage.RUN_FAILED else "")
        return self._failed[1]

    def _read_inputs(self):
        """{name: input image or float input}, read again only when their files changed;
        errors are kept too."""
        paths = [storage.results_path(self.run_dir, name) for name in (
            storage.INPUT_IMAGES_FILE, storage.VISUALIZATION_INPUTS_FILE)]
        key = tuple(storage.file_mtime(path) for path in paths)
        if key != self._inputs_key:
            self._inputs_key = key
            try:
                inputs = {}
                if key[1] is not None:
                    inputs.update(_as_dict(storage.read_visualization_inputs(self.run_dir)))
                if key[0] is not None:
                    inputs.update(_as_dict(storage.read_input_images(self.run_dir)))
                self._inputs = (inputs, None)
            except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
                self._inputs = ({}, error.with_traceback(None))
        if self._inputs[1] is not None:
            raise self._inputs[1].with_traceback(None)
        return self._inputs[0]

    def _on_image(self, attr, old, new):
        if not self.choosing_image:
            self.show()

    def _on_slider(self, attr, old, new):
        self.follow_latest = new >= len(self.steps) - 1
        self.show()


def _link_equal_images(panels):
    """Overlays of equally sized maps share pan and zoom."""
    plots = [plot for panel in panels for plot in panel.select({"type": Plot})
             if isinstance(plot.renderers[0].glyph, ImageRGBA)]
    for plot in plots[1:]:
        if (plot.renderers[0].data_source.data["image"][0].shape
                == plots[0].renderers[0].data_source.data["image"][0].shape
                and plot.frame_width == plots[0].frame_width):
            plot.x_range, plot.y_range = plots[0].x_range, plots[0].y_range


def _as_dict(value):
    if not isinstance(value, dict):
        raise ValueError("the inputs file must hold a dict")
    return value


def make_document(doc):
    """The side-by-side attribution app of the Bokeh server (path ``/attribution_methods``)."""
    doc.title = TECHNIQUE.title
    run_dir = open_run(doc)
    if run_dir is not None:
        AttributionMethodsDashboard(run_dir, attribution_techniques()).attach(doc)
