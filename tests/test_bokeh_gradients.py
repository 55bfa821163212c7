"""The Gradients dashboard and the alert banner above every dashboard."""
import json
import math
import os

from bokeh.document import Document
from bokeh.document.events import ColumnsStreamedEvent
from bokeh.models import Legend, LogScale

from custom_bokeh import layer_activations
from custom_bokeh.dashboard import MAX_BANNER_ALERTS, ImageDashboard
from custom_bokeh.gradients import GradientsDashboard
from custom_bokeh.training_progress import TrainingProgressDashboard
from custom_keras import registry, storage

LAYERS = ["conv2d", "dense", "dense_1"]


def write_norms(run_dir, steps):
    storage.append_rows(storage.results_path(run_dir, storage.GRADIENT_NORMS_TABLE),
                        ["step", "epoch", "batch"] + LAYERS,
                        [[step, step // 10, step % 10, 0.0 if step == 0 else 1e-3 * step, 0.5, 2.0]
                         for step in steps])


def write_dead(run_dir, steps):
    storage.append_rows(storage.results_path(run_dir, storage.DEAD_UNITS_TABLE),
                        ["step", "epoch", "batch", "dense"],
                        [[step, step // 10, step % 10, 0.1 * step] for step in steps])


def alert(kind, epoch, batch, message="went wrong", advice="try this"):
    return {"kind": kind, "epoch": epoch, "batch": batch, "step": 10 * epoch + batch,
            "message": message, "advice": advice, "value": 1.0, "time": 0.0}


def write_alerts(run_dir, *alerts):
    for one in alerts:
        storage.write_alert(run_dir, one)


def figures_of(dashboard):
    return [plot.children[0] for plot in (dashboard.norm_plot, dashboard.dead_plot)
            if hasattr(plot.children[0], "renderers")]


def test_norms_are_drawn_per_layer_on_a_log_axis_with_the_legend_beside(tmp_path):
    run_dir = str(tmp_path)
    write_norms(run_dir, range(3))
    write_dead(run_dir, range(3))
    dashboard = GradientsDashboard(run_dir)
    norms, dead = figures_of(dashboard)
    assert isinstance(norms.y_scale, LogScale)
    assert [r.glyph.y for r in norms.renderers] == LAYERS
    assert [r.glyph.y for r in dead.renderers] == ["dense"]
    legend = [item for item in norms.right if isinstance(item, Legend)]
    assert [i.label["value"] for i in legend[0].items] == LAYERS
    data = dashboard.norm_source.data
    assert list(data["step"]) == [0, 1, 2] and list(data["dense_1"]) == [2.0, 2.0, 2.0]
    assert math.isnan(data["conv2d"][0]) and data["conv2d"][2] == 2e-3  # 0 has no log
    assert list(data["epoch_from_1"]) == [1, 1, 1]
    assert list(dashboard.dead_source.data["dense"]) == [0.0, 0.1, 0.2]
    assert not dashboard.message.visible


def test_update_streams_only_the_new_rows(tmp_path):
    run_dir = str(tmp_path)
    write_norms(run_dir, range(2))
    dashboard = GradientsDashboard(run_dir)
    document = Document()
    dashboard.attach(document)
    streamed = []
    document.on_change(lambda event: streamed.append(event)
                       if isinstance(event, ColumnsStreamedEvent) else None)
    write_norms(run_dir, range(2, 5))
    dashboard.update()
    assert len(streamed) == 1 and list(streamed[0].data["step"]) == [2, 3, 4]
    assert len(dashboard.norm_source.data["step"]) == 5


def test_without_data_it_says_which_call_records_gradients(tmp_path):
    run_dir = str(tmp_path)
    storage.write_run_status(run_dir, storage.RUN_FINISHED)
    storage.write_techniques(run_dir, {"training_progress": {"state": "active"}})
    text = GradientsDashboard(run_dir).message.text
    assert "Not registered" in text
    assert "callbacks.register_training_progress()" in text
    assert "callbacks.register_health_checks()" in text


def test_health_checks_without_a_probe_say_why_no_norms_come(tmp_path):
    run_dir = str(tmp_path)
    storage.write_run_status(run_dir, storage.RUN_RUNNING)
    storage.write_techniques(run_dir, {"health_checks": {
        "state": "active", "reason": "without gradient norms and dead units: the model is built "
                                     "by its first batch (no keras.Input)"}})
    assert GradientsDashboard(run_dir).message.text == (
        "No gradient norms in this run: the health checks run without gradient norms and dead "
        "units: the model is built by its first batch (no keras.Input).")


def test_a_malformed_norm_row_is_reported_and_skipped(tmp_path):
    run_dir = str(tmp_path)
    write_norms(run_dir, range(2))
    storage.append_line(storage.results_path(run_dir, storage.GRADIENT_NORMS_TABLE), "1\tx")
    write_norms(run_dir, [2])
    dashboard = GradientsDashboard(run_dir)
    assert list(dashboard.norm_source.data["step"]) == [0, 1, 2]
    assert "Skipped 1 malformed line(s) of gradient_norms.tsv" in dashboard.message.text


def test_the_banner_names_the_latest_alerts_as_text_and_follows_new_ones(tmp_path):
    run_dir = str(tmp_path)
    write_alerts(run_dir, alert("exploding_gradients", 0, 5, "<b>norm</b> 4e3", "Lower it."))
    dashboard = ImageDashboard(run_dir, registry.get("layer_activations"),
                               layer_activations.render)
    banner = dashboard.layout.children[0]
    assert banner is dashboard.alerts.div and banner.render_as_text and banner.visible
    assert banner.text == ("1 alert from the health checks:\n"
                           "Epoch 1, batch 5 \u00b7 exploding gradients: <b>norm</b> 4e3 "
                           "Try: Lower it.")
    write_alerts(run_dir, *[alert("dead_units", 1, batch) for batch in range(5)])
    dashboard.update()
    lines = banner.text.split("\n")
    assert lines[0] == ("6 alerts from the health checks (the latest %d here, all on the "
                        "Overview tab):" % MAX_BANNER_ALERTS)
    assert lines[1].startswith("Epoch 2, batch 4 \u00b7 dead units") and len(lines) == 4


def test_every_kind_of_dashboard_has_the_banner(tmp_path):
    run_dir = str(tmp_path)
    write_alerts(run_dir, alert("nan_loss", 2, 1))
    for dashboard in (TrainingProgressDashboard(run_dir), GradientsDashboard(run_dir)):
        assert dashboard.layout.children[0].visible
        assert "nan loss: went wrong" in dashboard.layout.children[0].text


def test_no_alerts_no_banner(tmp_path):
    dashboard = TrainingProgressDashboard(str(tmp_path))
    assert not dashboard.alerts.div.visible


def test_a_hostile_alerts_file_gets_a_message_in_the_banner(tmp_path):
    run_dir = str(tmp_path)
    path = storage.results_path(run_dir, storage.ALERTS_FILE)
    write_alerts(run_dir, alert("nan_loss", 0, 1))
    with open(path, "a") as f:
        f.write("{broken\n" + json.dumps([1]) + "\n")
        f.write("x" * (storage.MAX_ALERTS_BYTES + 10) + "\n")
    banner = GradientsDashboard(run_dir).alerts.div
    assert "1 alert from the health checks" in banner.text
    assert "2 malformed line(s) of alerts.jsonl were skipped." in banner.text
    assert "Only the first" in banner.text


def test_an_alerts_file_of_one_huge_line_is_reported(tmp_path):
    run_dir = str(tmp_path)
    path = storage.results_path(run_dir, storage.ALERTS_FILE)
    storage.append_line(path, "x" * (storage.MAX_ALERTS_BYTES * 2))
    banner = GradientsDashboard(run_dir).alerts.div
    assert banner.visible and banner.text.startswith("The alerts could not be read:")


def test_named_pipes_and_links_as_tables_are_reported_without_waiting(tmp_path):
    run_dir = str(tmp_path)
    os.makedirs(storage.results_dir(run_dir))
    os.mkfifo(storage.results_path(run_dir, storage.ALERTS_FILE))
    os.mkfifo(storage.results_path(run_dir, storage.DEAD_UNITS_TABLE))
    os.symlink("/dev/zero", storage.results_path(run_dir, storage.GRADIENT_NORMS_TABLE))
    dashboard = GradientsDashboard(run_dir)
    assert dashboard.alerts.div.text.startswith("The alerts could not be read:")
    lines = dashboard.message.text.split("\n")
    assert lines[0].startswith("Could not read gradient_norms.tsv:")
    assert lines[1].startswith("Could not read dead_units.tsv:")
