"""The training progress dashboard: figures, validation circles, streaming of new rows only."""
import pytest
from bokeh.document import Document
from bokeh.document.events import ColumnDataChangedEvent, ColumnsStreamedEvent
from bokeh.models import HoverTool, Plot, Scatter, Select

from custom_bokeh.training_progress import TrainingProgressDashboard
from custom_keras import storage

COLUMNS = ["progress", "epoch", "batch", "loss", "accuracy", "mae", "loss_avg", "accuracy_avg"]
VAL_COLUMNS = ["epoch", "val_loss", "val_accuracy", "val_mae"]
BATCHES_PER_EPOCH = 4


def batch_row(step):
    epoch, batch = divmod(step, BATCHES_PER_EPOCH)
    loss = 2.0 / (1 + step)
    return [epoch + batch / BATCHES_PER_EPOCH, epoch, batch, loss, 1 - loss / 2, loss / 3,
            loss * 1.1, 1 - loss / 2.2]


def write_batches(run_dir, steps):
    for step in steps:
        storage.append_row(storage.results_path(run_dir, "training_progress.tsv"), COLUMNS,
                           batch_row(step))


def write_validation(run_dir, epoch):
    storage.append_row(storage.results_path(run_dir, "training_progress_val.tsv"), VAL_COLUMNS,
                       [epoch, 0.5 / epoch, 0.9 + 0.01 * epoch, 0.1 / epoch])


def figures_of(dashboard):
    figures = [child for child in dashboard.content.children if hasattr(child, "renderers")]
    return figures + [child for child in dashboard.other_figure.children
                      if hasattr(child, "renderers")]


def renderer_fields(fig):
    fields = []
    for renderer in fig.renderers:
        glyph = renderer.glyph
        fields.append((type(glyph).__name__, glyph.x, glyph.y, renderer.data_source))
    return fields


def test_figures_hold_every_batch_and_validation_value(tmp_path):
    run_dir = str(tmp_path)
    write_batches(run_dir, range(8))
    write_validation(run_dir, 1)
    write_validation(run_dir, 2)
    dashboard = TrainingProgressDashboard(run_dir)

    assert not dashboard.message.visible
    accuracy, loss, other = figures_of(dashboard)
    assert accuracy.title.text == "Batch accuracy" and loss.title.text == "Batch loss"
    assert ("Line", "progress", "accuracy", dashboard.batch_source) in renderer_fields(accuracy)
    assert ("Scatter", "epoch", "val_accuracy", dashboard.val_source) in renderer_fields(accuracy)
    assert ("Scatter", "epoch", "val_loss", dashboard.val_source) in renderer_fields(loss)
    circles = [r.glyph for r in loss.renderers if isinstance(r.glyph, Scatter)][0]
    assert circles.fill_color == "green"
    # pan and zoom move every plot along the same epoch axis
    assert accuracy.x_range is loss.x_range is other.x_range

    data = dashboard.batch_source.data
    assert list(data["progress"]) == [batch_row(s)[0] for s in range(8)]
    assert list(data["loss"]) == [batch_row(s)[3] for s in range(8)]
    assert list(dashboard.val_source.data["epoch"]) == [1, 2]
    assert list(dashboard.val_source.data["val_loss"]) == [0.5, 0.25]

    tool_types = {type(tool).__name__ for tool in loss.toolbar.tools}
    assert {"PanTool", "WheelZoomTool", "BoxZoomTool", "ResetTool", "SaveTool",
            "HoverTool"} <= tool_types
    hover = [t for t in loss.toolbar.tools if isinstance(t, HoverTool)][0]
    assert ("loss", "@{loss}{0.000000}") in hover.tooltips


def test_every_other_metric_is_selectable(tmp_path):
    run_dir = str(tmp_path)
    write_batches(run_dir, range(3))
    write_validation(run_dir, 1)
    dashboard = TrainingProgressDashboard(run_dir)

    select = [c for c in dashboard.content.children if isinstance(c, Select)][0]
    assert select.options == ["mae", "loss_avg", "accuracy_avg"]
    assert renderer_fields(figures_of(dashboard)[-1])[0][2] == "mae"
    select.value = "loss_avg"
    other = figures_of(dashboard)[-1]
    assert other.title.text == "Batch loss avg"
    assert [f[2] for f in renderer_fields(other)] == ["loss_avg"]  # no val_loss_avg circles
    select.value = "mae"
    assert [f[2] for f in renderer_fields(figures_of(dashboard)[-1])] == ["mae", "val_mae"]


def test_update_streams_only_the_new_rows(tmp_path):
    run_dir = str(tmp_path)
    write_batches(run_dir, range(5))
    dashboard = TrainingProgressDashboard(run_dir)
    doc = Document()
    dashboard.attach(doc)
    events = []
    doc.on_change(events.append)

    def sent(source):
        """What the browser received for ``source``: ("stream", data) or ("replace", None)."""
        return [("stream", e.data) if isinstance(e, ColumnsStreamedEvent) else ("replace", None)
                for e in events if getattr(e, "model", None) is source
                and isinstance(e, (ColumnsStreamedEvent, ColumnDataChangedEvent))]

    dashboard.update()
    assert sent(dashboard.batch_source) == [] and sent(dashboard.val_source) == []

    write_batches(run_dir, range(5, 8))
    write_validation(run_dir, 1)
    dashboard.update()
    [(kind, data)] = sent(dashboard.batch_source)
    assert kind == "stream" and set(data) == set(COLUMNS)
    assert list(data["batch"]) == [batch_row(s)[2] for s in range(5, 8)]
    assert [(kind, {k: list(v) for k, v in data.items()}) for kind, data in sent(
        dashboard.val_source)] == [("stream", {"epoch": [1.0], "val_loss": [0.5],
                                               "val_accuracy": [0.91], "val_mae": [0.1]})]

    # every later update sends as many rows as were written, however long the run is
    for first in range(8, 40, 4):
        write_batches(run_dir, range(first, first + 4))
        dashboard.update()
        kind, data = sent(dashboard.batch_source)[-1]
        assert kind == "stream" and len(data["loss"]) == 4
    assert len(sent(dashboard.batch_source)) == 9
    assert len(dashboard.batch_source.data["loss"]) == 40


def test_appendix_d_text_files_are_shown_when_no_table_exists(tmp_path):
    run_dir = str(tmp_path)
    for progress, accuracy, loss in [(0.0, 0.1, 2.3), (0.5, 0.4, 1.7), (1.0, 0.7, 0.9)]:
        storage.append_line(storage.results_path(run_dir, "training_progress.txt"),
                            "%r %r %r" % (progress, accuracy, loss))
    storage.append_line(storage.results_path(run_dir, "training_progress_val.txt"), "1 0.75 0.8")
    dashboard = TrainingProgressDashboard(run_dir)

    assert [f.title.text for f in figures_of(dashboard)] == ["Batch accuracy", "Batch loss"]
    assert list(dashboard.batch_source.data["loss"]) == [2.3, 1.7, 0.9]
    assert list(dashboard.val_source.data["val_accuracy"]) == [0.75]


def test_a_run_that_ended_without_registering_names_the_register_call(tmp_path):
    storage.write_run_status(str(tmp_path), "finished", 0)
    dashboard = TrainingProgressDashboard(str(tmp_path))
    assert dashboard.message.visible
    assert "callbacks.register_training_progress()" in dashboard.message.text
    assert not list(dashboard.content.select({"type": Plot}))


def test_a_malformed_row_is_reported_and_skipped(tmp_path):
    run_dir = str(tmp_path)
    write_batches(run_dir, range(2))
    storage.append_line(storage.results_path(run_dir, "training_progress.tsv"), "0.5\t1")
    write_batches(run_dir, range(2, 4))
    dashboard = TrainingProgressDashboard(run_dir)
    assert dashboard.message.visible
    assert dashboard.message.text == (
        "Skipped 1 malformed line(s) of training_progress.tsv, the last: '0.5\\t1'")
    assert list(dashboard.batch_source.data["batch"]) == [0, 1, 2, 3]
    write_batches(run_dir, range(4, 6))
    dashboard.update()  # later rows still arrive
    assert list(dashboard.batch_source.data["batch"]) == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("ended_before_opening", [True, False])
def test_polling_stops_once_the_run_has_ended(tmp_path, ended_before_opening):
    run_dir = str(tmp_path)
    write_batches(run_dir, range(4))
    if ended_before_opening:
        storage.write_run_status(run_dir, "finished", 0)
    dashboard = TrainingProgressDashboard(run_dir)
    doc = Document()
    dashboard.attach(doc)
    if not ended_before_opening:
        assert len(doc.session_callbacks) == 1
        write_batches(run_dir, range(4, 6))
        storage.write_run_status(run_dir, "finished", 0)
        dashboard.update()  # the last read still picks up the rows written before the end
    assert doc.session_callbacks == []
    assert len(dashboard.batch_source.data["loss"]) == (4 if ended_before_opening else 6)
