"""Training progress dashboard: every metric per batch against epochs, validation per epoch.

Reads ``results/training_progress.tsv`` (header: progress, epoch, batch, every
logged metric, ``<metric>_avg`` running averages) and
``training_progress_val.tsv`` (epoch and every ``val_`` metric); a run that
only has the Appendix D files ``training_progress.txt`` ("progress accuracy
loss") and ``training_progress_val.txt`` ("epoch val_accuracy val_loss") is
shown from those. Tables are read from a byte offset and new rows are
*streamed* to the browser, so an update costs the same however long the run is.
The tables are hostile input: read through ``custom_keras.storage``'s safe readers
(a link or a named pipe is reported, never followed or waited on), at most
``storage.MAX_LINES_BYTES`` per update, and drawn up to ``MAX_TABLE_ROWS`` rows of
``MAX_TABLE_COLUMNS`` columns, with a message once a cap is reached.
"""
import os

from bokeh.layouts import column
from bokeh.models import ColumnDataSource, DataRange1d, Div, HoverTool, Select
from bokeh.plotting import figure

from custom_bokeh.dashboard import LiveDashboard, NoDataMessage, message_div, open_run, show_message
from custom_keras import registry, storage

TECHNIQUE = registry.get("training_progress")
POSITION_COLUMNS = ("progress", "epoch", "batch")
BATCH_COLOR = "#1f77b4"
VALIDATION_COLOR = "green"
TOOLS = "pan,wheel_zoom,box_zoom,reset,save"
MAX_TABLE_ROWS = 200_000   # rows of one table drawn; a run of 200 epochs of 1000 batches fits
MAX_TABLE_COLUMNS = 64     # metrics and positions of one table


class TableReader:
    """New rows of a results table, from the .tsv or else its Appendix D .txt twin.

    Args:
        run_dir: the run folder.
        tsv_name: the tab-separated table with a header line (``storage.append_row``).
        txt_name: the Appendix D file: space-separated, no header; None for a table without one.
        txt_columns: the column names of the Appendix D file.
        max_columns: a header of more columns is refused.

    Reads from a byte offset like ``storage.read_table``, but a malformed line
    is skipped and counted (``bad_lines``, ``last_bad_line``) instead of stopping
    every later read. Once ``MAX_TABLE_ROWS`` rows were read, later rows are not
    (``capped``); a table of more than ``max_columns`` columns is refused.

    Raises (``read``):
        OSError: the table is a link, not a regular file, or has a line over
            ``storage.MAX_LINES_BYTES`` (``storage.UnsafeFileError``).
        ValueError: the header has more than ``max_columns`` columns.
    """

    def __init__(self, run_dir, tsv_name, txt_name=None, txt_columns=(),
                 max_columns=MAX_TABLE_COLUMNS):
        self.run_dir = run_dir
        self.tsv_path = storage.results_path(run_dir, tsv_name)
        self.txt_path = storage.results_path(run_dir, txt_name) if txt_name else self.tsv_path
        self.txt_columns = list(txt_columns)
        self.max_columns = max_columns
        self.path, self.offset, self.columns = None, 0, None
        self.bad_lines, self.last_bad_line = 0, None
        self.rows_read = 0

    @property
    def capped(self):
        return self.rows_read >= MAX_TABLE_ROWS

    def read(self):
        """(columns, new rows as {column: values}, restarted).

        ``columns`` is set when the reader (re)started at the top of a file;
        ``restarted`` says that rows read before must be dropped (the .tsv
        appeared, or a re-run replaced the file).
        """
        # lexists: a link counts as there, so that reading it reports it
        path = self.tsv_path if os.path.lexists(self.tsv_path) else self.txt_path
        if not os.path.lexists(path):
            return None, {}, False
        restarted = self.path is not None and (
            path != self.path or storage.file_size(path) < self.offset)
        if restarted or self.path is None:
            self.path, self.offset, self.columns, self.rows_read = path, 0, None, 0
        if self.capped:
            return None, {}, restarted
        at_top = self.offset == 0
        lines, self.offset = storage.read_complete_lines(self.run_dir, path, self.offset)
        tsv = path == self.tsv_path
        if at_top and lines:
            columns = lines.pop(0).split("\t") if tsv else self.txt_columns
            if len(columns) > self.max_columns:
                self.offset = 0  # read the header again next time; it is refused again
                raise ValueError("%s has %d columns; the dashboard draws at most %d" % (
                    os.path.basename(path), len(columns), self.max_columns))
            self.columns = columns
        lines = lines[:MAX_TABLE_ROWS - self.rows_read]
        rows = []
        for line in lines:
            row = _parse_row(line.split("\t") if tsv else line.split(), len(self.columns))
            if row is None:
                self.bad_lines, self.last_bad_line = self.bad_lines + 1, line
            else:
                rows.append(row)
        self.rows_read += len(lines)
        new_rows = {name: [row[i] for row in rows] for i, name in enumerate(self.columns or [])}
        return (self.columns if at_top else None), (new_rows if rows else {}), restarted

    def problem(self):
        """Sentences about skipped lines and the row cap, or ""."""
        problems = []
        if self.bad_lines:
            problems.append("Skipped %d malformed line(s) of %s, the last: %r" % (
                self.bad_lines, os.path.basename(self.path), self.last_bad_line[:200]))
        if self.capped:
            problems.append("Showing the first %d rows of %s; later rows are not drawn." % (
                MAX_TABLE_ROWS, os.path.basename(self.path)))
        return "\n".join(problems)


def _parse_row(values, count):
    try:
        row = [float(v) for v in values]
    except ValueError:
        return None
    return row if len(row) == count else None


class TrainingProgressDashboard(LiveDashboard):
    """Live plots of one run's training progress.

    Args:
        run_dir: the run folder.

    ``layout`` is the page; ``update()`` is the periodic callback.
    """

    def __init__(self, run_dir):
        super().__init__(run_dir)
        self._no_data = NoDataMessage(TECHNIQUE, run_dir)
        self.batches = TableReader(run_dir, storage.TRAINING_PROGRESS_TABLE,
                                   storage.TRAINING_PROGRESS_FILE, ("progress", "accuracy", "loss"))
        self.validation = TableReader(run_dir, storage.TRAINING_PROGRESS_VAL_TABLE,
                                      storage.TRAINING_PROGRESS_VAL_FILE,
                                      ("epoch", "val_accuracy", "val_loss"))
        self.batch_source = ColumnDataSource(data={}, name="batch_rows")
        self.val_source = ColumnDataSource(data={}, name="validation_rows")
        self.metrics = []
        self.x_range = DataRange1d()  # shared: pan and zoom move every plot along the epochs
        self.message = message_div()
        self.metric_select = Select(title="Other metric", options=[], width=260)
        self.metric_select.on_change("value", lambda attr, old, new: self._show_other_metric())
        # an empty column makes Bokeh warn (EMPTY_LAYOUT): each holds a placeholder until drawn
        self.other_figure = column(Div(visible=False), sizing_mode="stretch_width")
        self.content = column(Div(visible=False), sizing_mode="stretch_width")
        self.layout = column(self.alerts.div, self.message, self.content,
                             sizing_mode="stretch_width")
        self.update()

    def read_new(self):
        """Streams the rows written since the last call."""
        problems = []
        try:
            self._read_batches()
            if self.metrics:
                self._read_validation()
        except (OSError, ValueError) as error:  # a link, a named pipe, a huge line or header
            problems.append("Could not read the training progress: %s" % error)
        problems += [reader.problem() for reader in (self.batches, self.validation)]
        if any(problems):
            show_message(self.message, "\n".join(p for p in problems if p), error=True)
        else:
            show_message(self.message, "" if self.metrics else self._no_data.text())

    def _read_batches(self):
        columns, new_rows, _ = self.batches.read()
        if columns:
            self._build(columns)
        if new_rows and self.metrics:
            self.batch_source.stream(new_rows)

    def _read_validation(self):
        columns, new_rows, restarted = self.validation.read()
        if restarted:
            self.val_source.data = {name: [] for name in self.val_source.data}
        if new_rows:
            count = len(next(iter(new_rows.values())))
            self.val_source.stream({name: new_rows.get(name, [float("nan")] * count)
                                    for name in self.val_source.data})

    def _build(self, columns):
        """(Re)creates the sources and figures for the columns of a (new) batch table."""
        self.batch_columns = columns
        self.metrics = [c for c in columns if c not in POSITION_COLUMNS]
        self.batch_source.data = {name: [] for name in columns}
        self.val_source.data = {name: [] for name in ["epoch"] + [
            "val_" + m for m in self.metrics if not m.endswith("_avg")]}
        self.validation.path = None
        accuracy = next((m for m in self.metrics if m == "accuracy"),
                        next((m for m in self.metrics if "acc" in m and not m.endswith("_avg")),
                             None))
        main = [m for m in (accuracy, "loss") if m in self.metrics]
        others = [m for m in self.metrics if m not in main]
        self.content.children = ([self._metric_figure(m) for m in main]
                                 + ([self.metric_select, self.other_figure] if others else []))
        shown = self.metric_select.value
        self.metric_select.update(options=others, value=others[0] if others else "")
        if self.metric_select.value == shown:  # else the Select's callback drew it already
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


def make_document(doc):
    """The training progress app of the Bokeh server."""
    doc.title = TECHNIQUE.title
    run_dir = open_run(doc)
    if run_dir is not None:
        TrainingProgressDashboard(run_dir).attach(doc)
