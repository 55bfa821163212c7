"""Gradients dashboard: per-layer gradient norms and dead-unit fractions over training.

Reads ``results/gradient_norms.tsv`` ("step epoch batch <layer>...") and
``results/dead_units.tsv`` ("step epoch batch <ReLU layer>..."), written by the
health checks (``register_health_checks()``, also added by
``register_training_progress()``). Like the training progress dashboard, the
tables are read from a byte offset through the safe readers and only new rows
are *streamed* to the browser.
"""
import dataclasses
import math
import os

from bokeh.layouts import column
from bokeh.models import ColumnDataSource, DataRange1d, Div, HoverTool, Legend, LegendItem
from bokeh.palettes import Category10_10, Category20_20
from bokeh.plotting import figure

from custom_bokeh.dashboard import LiveDashboard, NoDataMessage, message_div, open_run, show_message
from custom_bokeh.training_progress import TOOLS, TableReader
from custom_keras import registry, storage

TECHNIQUE = registry.get("gradients")
# The health checks record their state in techniques.json under their own key.
HEALTH_CHECKS = dataclasses.replace(TECHNIQUE, key="health_checks", title="health checks")
POSITION_COLUMNS = ("step", "epoch", "batch")
MAX_LAYER_COLUMNS = 256   # layers of one table drawn, each a line with a legend entry
LEGEND_LABEL_WIDTH = 110
SHOWN_EPOCH = "epoch_from_1"   # epochs counted from 1 in the hover, as Keras prints them
COMES_WITH = ("Gradient norms and dead units come with callbacks.register_training_progress() "
              "(unless health_checks=False) or callbacks.register_health_checks().")


def positive_or_nan(value):
    """A zero norm (a layer without gradient this batch) has no place on a log axis."""
    return value if value > 0 else math.nan


def layer_colors(count):
    palette = Category10_10 if count <= 10 else Category20_20
    return [palette[i % len(palette)] for i in range(count)]


class GradientsDashboard(LiveDashboard):
    """Live plots of one run's gradient norms and dead-unit fractions per layer.

    Args:
        run_dir: the run folder.

    ``layout`` is the page; ``update()`` is the periodic callback.
    """

    def __init__(self, run_dir):
        super().__init__(run_dir)
        self._no_data = NoDataMessage(HEALTH_CHECKS, run_dir)
        self.norms = TableReader(run_dir, storage.GRADIENT_NORMS_TABLE,
                                 max_columns=MAX_LAYER_COLUMNS + len(POSITION_COLUMNS))
        self.dead = TableReader(run_dir, storage.DEAD_UNITS_TABLE,
                                max_columns=MAX_LAYER_COLUMNS + len(POSITION_COLUMNS))
        self.norm_source = ColumnDataSource(data={}, name="gradient_norm_rows")
        self.dead_source = ColumnDataSource(data={}, name="dead_unit_rows")
        self.x_range = DataRange1d()  # shared: pan and zoom move both plots along the steps
        self.message = message_div()
        # an empty column makes Bokeh warn (EMPTY_LAYOUT): each holds a placeholder until drawn
        self.norm_plot = column(Div(visible=False), sizing_mode="stretch_width")
        self.dead_plot = column(Div(visible=False), sizing_mode="stretch_width")
        self.layout = column(self.alerts.div, self.message, self.norm_plot, self.dead_plot,
                             sizing_mode="stretch_width")
        self.update()

    def read_new(self):
        """Streams the rows written since the last call."""
        problems = []
        for reader, source, plot, draw, drawn in (
                (self.norms, self.norm_source, self.norm_plot, self._norm_figure, positive_or_nan),
                (self.dead, self.dead_source, self.dead_plot, self._dead_figure, float)):
            try:
                self._read(reader, source, plot, draw, drawn)
            except (OSError, ValueError) as error:  # a link, a named pipe, a huge line or header
                problems.append("Could not read %s: %s" % (
                    os.path.basename(reader.tsv_path), error))
            problems.append(reader.problem())
        problems = [p for p in problems if p]
        if problems:
            show_message(self.message, "\n".join(problems), error=True)
        else:
            show_message(self.message, "" if self.norm_source.data else self._no_data_text())

    def _no_data_text(self):
        entry = (storage.read_techniques(self.run_dir) or {}).get(HEALTH_CHECKS.key) or {}
        if entry.get("state") == storage.TECHNIQUE_ACTIVE and entry.get("reason"):
            # the health checks run, but without a probe of the model: no norms will come
            return "No gradient norms in this run: the health checks run %s." % entry["reason"]
        return "%s\n%s" % (self._no_data.text(), COMES_WITH)

    @staticmethod
    def _read(reader, source, plot, draw, drawn):
        """Streams new rows of one table; ``drawn(value)`` is what a layer's value draws as."""
        columns, new_rows, restarted = reader.read()
        if restarted and not columns:
            source.data = {}
        if columns:
            layers = [c for c in columns if c not in POSITION_COLUMNS]
            source.data = {name: [] for name in columns + [SHOWN_EPOCH]}
            plot.children = [draw(layers)]
        if new_rows and source.data:
            rows = {name: (values if name in POSITION_COLUMNS else [drawn(v) for v in values])
                    for name, values in new_rows.items()}
            rows[SHOWN_EPOCH] = [epoch + 1 for epoch in rows["epoch"]]
            source.stream(rows)

    def _norm_figure(self, layers):
        fig = self._figure("Gradient norm per layer", "gradient norm (log scale)", "log")
        self._lines(fig, layers, self.norm_source, "{0.000e}")
        return fig

    def _dead_figure(self, layers):
        fig = self._figure("Dead units per ReLU layer", "fraction of units dead", "linear")
        self._lines(fig, layers, self.dead_source, "{0.0%}")
        return fig

    def _figure(self, title, y_label, y_axis_type):
        fig = figure(title=title, height=320, sizing_mode="stretch_width", tools=TOOLS,
                     active_scroll="wheel_zoom", x_range=self.x_range, y_axis_type=y_axis_type,
                     x_axis_label="training step (batches, all epochs)", y_axis_label=y_label)
        fig.min_border_left = 80  # both plots alike, whatever their tick labels: x axes align
        fig.toolbar.logo = None
        return fig

    @staticmethod
    def _lines(fig, layers, source, number_format):
        items = []
        for layer, color in zip(layers, layer_colors(len(layers))):
            line = fig.line("step", layer, source=source, color=color, line_width=1.5)
            items.append(LegendItem(label=layer, renderers=[line]))
            fig.add_tools(HoverTool(renderers=[line], tooltips=[
                ("layer", layer), ("epoch", "@%s{0}" % SHOWN_EPOCH), ("batch", "@batch{0}"),
                ("value", "@{%s}%s" % (layer, number_format))]))
        # the same label width in both plots keeps their x axes aligned (short layer names)
        legend = Legend(items=items, click_policy="hide", label_text_font_size="11px",
                        label_width=LEGEND_LABEL_WIDTH)
        fig.add_layout(legend, "right")


def make_document(doc):
    """The gradients app of the Bokeh server."""
    doc.title = TECHNIQUE.title
    run_dir = open_run(doc)
    if run_dir is not None:
        GradientsDashboard(run_dir).attach(doc)
