"""Training progress dashboard: every metric per batch against epochs, validation per epoch.

Reads ``results/training_progress.tsv`` (header: progress, epoch, batch, every
logged metric, ``<metric>_avg`` running averages) and
``training_progress_val.tsv`` (epoch and every ``val_`` metric); a run that
only has the Appendix D files ``training_progress.txt`` ("progress accuracy
loss") and ``training_progress_val.txt`` ("epoch val_accuracy val_loss") is
shown from those. Tables are read from a byte offset and new rows are
*streamed* to the browser, so an update costs the same however long the run is.
"""
import os

from bokeh.layouts import column
from bokeh.models import ColumnDataSource, DataRange1d, HoverTool, Select
from bokeh.plotting import figure

from custom_bokeh.dashboard import (POLL_MS, message_div, no_data_text, open_run, run_has_ended,
                                    show_message)
from custom_keras import registry, storage

TECHNIQUE = registry.get("training_progress")
POSITION_COLUMNS = ("progress", "epoch", "batch")
BATCH_COLOR = "#1f77b4"
VALIDATION_COLOR = "green"
TOOLS = "pan,wheel_zoom,box_zoom,reset,save"


class TableReader:
    """New rows of a results table, from the .tsv or else its Appendix D .txt twin.

    Args:
        run_dir: the run folder.
        tsv_name: the tab-separated table with a header line.
        txt_name: the Appendix D file: space-separated, no header.
        txt_columns: the column names of the Appendix D file.

    ``read()`` returns (columns, rows, restarted): ``columns`` is set when the
    reader (re)started at the top of a file, ``restarted`` says that rows read
    before must be dropped (the .tsv appeared, or a re-run replaced the file).
    """

    def __init__(self, run_dir, tsv_name, txt_name, txt_columns):
        self.tsv_path = storage.results_path(run_dir, tsv_name)
        self.txt_path = storage.results_path(run_dir, txt_name)
        self.txt_columns = list(txt_columns)
        self.path, self.offset = None, 0

    def read(self):
        path = self.tsv_path if os.path.exists(self.tsv_path) else self.txt_path
        if not os.path.exists(path):
            return None, [], False
        restarted = self.path is not None and (path != self.path or _size(path) < self.offset)
        if restarted or self.path is None:
            self.path, self.offset = path, 0
        if path == self.tsv_path:
            columns, rows, self.offset = storage.read_table(path, self.offset)
        else:
            at_top = self.offset == 0
            lines, self.offset = storage.read_complete_lines(path, self.offset)
            columns = self.txt_columns if at_top and lines else None
            rows = [[float(v) for v in line.split()] for line in lines if line.strip()]
        return columns, rows, restarted


def _size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


class TrainingProgressDashboard:
    """Live plots of one run's training progress.

    Args:
        run_dir: the run folder.

    ``layout`` is the page; ``update()`` is the periodic callback.
    """

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.batches = TableReader(run_dir, "training_progress.tsv", "training_progress.txt",
                                   ("progress", "accuracy", "loss"))
        self.validation = TableReader(run_dir, "training_progress_val.tsv",
                                      "training_progress_val.txt",
                                      ("epoch", "val_accuracy", "val_loss"))
        self.batch_source = ColumnDataSource(data={}, name="batch_rows")
        self.val_source = ColumnDataSource(data={}, name="validation_rows")
        self.metrics = []
        self.x_range = DataRange1d()  # shared: pan and zoom move every plot along the epochs
        self.message = message_div()
        self.metric_select = Select(title="Other metric", options=[], width=260)
        self.metric_select.on_change("value", lambda attr, old, new: self._show_other_metric())
        self.other_figure = column(sizing_mode="stretch_width")
        self.content = column(sizing_mode="stretch_width")
        self.layout = column(self.message, self.content, sizing_mode="stretch_width")
        self._doc = self._poll_callback = None
        self._ended = False
        self.update()

    def attach(self, doc):
        """Adds the page to ``doc`` and starts polling unless the run has already ended."""
        self._doc = doc
        doc.add_root(self.layout)
        if not self._ended:
            self._poll_callback = doc.add_periodic_callback(self.update, POLL_MS)

    def update(self):
        """Streams the rows written since the last call; stops polling after the run ended."""
        self._ended = run_has_ended(self.run_dir)  # read before the tables: no row is missed
        try:
            self._read_batches()
            if self.metrics:
                self._read_validation()
        except ValueError as error:
            show_message(self.message, "Could not read %s: %s" % (
                os.path.basename(self.batches.path or ""), error), error=True)
        else:
            show_message(self.message, "" if self.metrics else no_data_text(TECHNIQUE, self._ended))
        if self._ended and self._poll_callback is not None:
            self._doc.remove_periodic_callback(self._poll_callback)
            self._poll_callback = None

    def _read_batches(self):
        columns, rows, restarted = self.batches.read()
        if columns:
            self._build(columns)
        if rows and self.metrics:
            self.batch_source.stream(_columns_of(self.batch_columns, rows))

    def _read_validation(self):
        columns, rows, restarted = self.validation.read()
        if restarted:
            self.val_source.data = {name: [] for name in self.val_source.data}
        if columns:
            self.val_file_columns = columns
        if rows:
            by_name = _columns_of(self.val_file_columns, rows)
            nan = [float("nan")] * len(rows)
            self.val_source.stream({name: by_name.get(name, nan) for name in self.val_source.data})

    def _build(self, columns):
        """(Re)creates the sources and figures for the columns of a (new) batch table."""
        self.batch_columns = columns
        self.metrics = [c for c in columns if c not in POSITION_COLUMNS]
        self.batch_source.data = {name: [] for name in columns}
        self.val_source.data = {name: [] for name in ["epoch"] + [
            "val_" + m for m in self.metrics if not m.endswith("_avg")]}
        self.val_file_columns = []
        self.validation.path = None
        accuracy = next((m for m in self.metrics if m == "accuracy"),
                        next((m for m in self.metrics if "acc" in m and not m.endswith("_avg")),
                             None))
        main = [m for m in (accuracy, "loss") if m in self.metrics]
        others = [m for m in self.metrics if m not in main]
        self.metric_select.update(options=others, value=others[0] if others else "")
        self.content.children = ([self._metric_figure(m) for m in main]
                                 + ([self.metric_select, self.other_figure] if others else []))
        self._show_other_metric()

    def _show_other_metric(self):
        metric = self.metric_select.value
        if metric in self.metrics:
            self.other_figure.children = [self._metric_figure(metric)]

    def _metric_figure(self, metric):
        """One metric per batch as a line, its validation value per epoch as green circles."""
        fig = figure(title="Batch %s" % metric.replace("_", " "), height=260,
                     sizing_mode="stretch_width", tools=TOOLS, active_scroll="wheel_zoom",
                     x_range=self.x_range, x_axis_label="epoch", y_axis_label=metric)
        line = fig.line("progress", metric, source=self.batch_source, color=BATCH_COLOR,
                        line_width=1.5, legend_label="batch")
        fig.add_tools(HoverTool(renderers=[line], mode="vline", tooltips=[
            ("epochs trained", "@progress{0.0000}"), ("batch", "@batch{0}"),
            (metric, "@{%s}{0.000000}" % metric)]))
        val_name = "val_" + metric
        if val_name in self.val_source.data:
            circles = fig.scatter("epoch", val_name, source=self.val_source, size=9,
                                  color=VALIDATION_COLOR, legend_label="validation")
            fig.add_tools(HoverTool(renderers=[circles], tooltips=[
                ("after epoch", "@epoch{0}"), (val_name, "@{%s}{0.000000}" % val_name)]))
        fig.legend.location = "top_right" if "acc" not in metric else "bottom_right"
        fig.legend.click_policy = "hide"
        fig.toolbar.logo = None
        return fig


def _columns_of(columns, rows):
    """Rows (lists of floats) as {column name: values}; extra or missing values are an error."""
    for row in rows:
        if len(row) != len(columns):
            raise ValueError("a row has %d values but the header names %d columns"
                             % (len(row), len(columns)))
    return {name: [row[i] for row in rows] for i, name in enumerate(columns)}


def make_document(doc):
    """The training progress app of the Bokeh server."""
    doc.title = TECHNIQUE.title
    run_dir = open_run(doc)
    if run_dir is not None:
        TrainingProgressDashboard(run_dir).attach(doc)
