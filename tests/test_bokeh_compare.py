"""Comparison dashboards: their tokens, the overlaid curves, and the shared stage slider."""
import os

import numpy as np
import pytest
from bokeh.models import Line, Plot, Scatter

from custom_bokeh import auth, compare, saliency_maps
from custom_bokeh.dashboard import open_run
from custom_keras import registry, storage
from test_bokeh_auth import (SECRET, autoload, session_document, signed_token, start_server,
                             stop_server, tampered)

LABELS = ("adam_3.py \u00b7 run 1 \u00b7 2026-11-30 04:00",
          "adam_2.py \u00b7 run 1 \u00b7 2026-11-30 04:05")
SALIENCY = registry.get("saliency_maps")
CURVES, IMAGES = auth.COMPARE_CURVES_APP, auth.COMPARE_IMAGES_APP


RUN_A, RUN_B, FOREIGN_RUN = "3/adam_3/runs/1", "3/adam_2/runs/2", "4/other_script/runs/4"
RUN_NUMBERS = {"adam_3": 1, "adam_2": 2, "third": 3}


@pytest.fixture
def storage_dir(tmp_path):
    for run in (RUN_A, RUN_B, "3/third/runs/3", FOREIGN_RUN):
        os.makedirs(tmp_path / run)
    return str(tmp_path)


def runs_of(storage_dir, *names):
    return [(os.path.join(storage_dir, "3", name, "runs", str(RUN_NUMBERS[name])), label)
            for name, label in zip(names, LABELS)]


# --- tokens --------------------------------------------------------------------

def test_a_comparison_token_grants_its_runs_in_order_with_their_labels(storage_dir):
    token = auth.make_compare_token(
        SECRET, 3, [(RUN_B, LABELS[1]), (RUN_A, LABELS[0])], IMAGES,
        technique_key="saliency_maps")
    grant = auth.verify_compare_token(token, SECRET, storage_dir, IMAGES)
    assert grant.run_dirs == (os.path.join(os.path.realpath(storage_dir), *RUN_B.split("/")),
                              os.path.join(os.path.realpath(storage_dir), *RUN_A.split("/")))
    assert grant.labels == (LABELS[1], LABELS[0])
    assert grant.technique_key == "saliency_maps"


@pytest.mark.parametrize("runs", [
    [(RUN_A, "a"), (FOREIGN_RUN, "b")],
    [(RUN_A, "a"), (RUN_A.rsplit("/", 1)[0] + "/..", "b")],
    [(FOREIGN_RUN, "a"), (FOREIGN_RUN, "b")],
])
def test_a_comparison_token_cannot_be_made_for_a_foreign_folder(runs):
    with pytest.raises(ValueError, match="of user 3"):
        auth.make_compare_token(SECRET, 3, runs, CURVES)


@pytest.mark.parametrize("count", [0, 1, 5])
def test_a_comparison_token_needs_two_to_four_runs(count):
    with pytest.raises(ValueError, match="a comparison shows 2 to 4 runs, got %d" % count):
        auth.make_compare_token(SECRET, 3, [("3/script_%d/runs/%d" % (i, i), "r")
                                            for i in range(count)], CURVES)


def bad_compare_tokens():
    valid = auth.make_compare_token(SECRET, 3, [(RUN_A, "a"), (RUN_B, "b")], CURVES)
    return {
        "foreign run slipped in": tampered(valid, runs=[RUN_A, FOREIGN_RUN]),
        "forged": auth.make_compare_token("another key", 3, [(RUN_A, "a"), (RUN_B, "b")],
                                          CURVES),
        "expired": auth.make_compare_token(SECRET, 3, [(RUN_A, "a"), (RUN_B, "b")],
                                           CURVES, expiration_s=-1),
        "other comparison app": auth.make_compare_token(
            SECRET, 3, [(RUN_A, "a"), (RUN_B, "b")], IMAGES, "saliency_maps"),
        "one-run token": auth.make_token(SECRET, 3, RUN_A, "training_progress"),
        "foreign run, signed": signed_token(SECRET, {
            "user_id": 3, "compare": CURVES, "runs": [RUN_A, FOREIGN_RUN],
            "labels": ["a", "b"]}),
        "run outside storage, signed": signed_token(SECRET, {
            "user_id": 3, "compare": CURVES, "runs": [RUN_A, RUN_A.rsplit("/", 1)[0] + "/.."],
            "labels": ["a", "b"]}),
        "five runs, signed": signed_token(SECRET, {
            "user_id": 3, "compare": CURVES, "runs": [RUN_A] * 5, "labels": ["a"] * 5}),
        "runs without labels, signed": signed_token(SECRET, {
            "user_id": 3, "compare": CURVES, "runs": [RUN_A, RUN_B]}),
    }


@pytest.mark.parametrize("name", sorted(bad_compare_tokens()))
def test_bad_comparison_tokens_are_refused(storage_dir, name):
    with pytest.raises(auth.InvalidToken):
        auth.verify_compare_token(bad_compare_tokens()[name], SECRET, storage_dir, CURVES)


def test_a_comparison_token_opens_no_one_run_dashboard(storage_dir):
    token = auth.make_compare_token(SECRET, 3, [(RUN_A, "a"), (RUN_B, "b")], IMAGES,
                                    technique_key="training_progress")
    with pytest.raises(auth.InvalidToken, match="another dashboard"):
        auth.verify_token(token, SECRET, storage_dir, "training_progress")


def test_the_images_app_needs_a_snapshot_technique(storage_dir):
    application = compare.CompareApplication(lambda doc: None, storage_dir, SECRET, IMAGES)
    for technique_key in ("training_progress", "no_such_technique", None):
        token = auth.make_compare_token(SECRET, 3, [(RUN_A, "a"), (RUN_B, "b")], IMAGES,
                                        technique_key=technique_key)
        doc = session_document(token, application)
        assert open_run(doc) is None
        assert doc.roots[0].text == "Access refused: the session token names no snapshot technique."


def test_the_server_serves_the_comparison_apps_only_with_comparison_tokens(tmp_path):
    storage_dir = str(tmp_path)
    for run in (RUN_A, RUN_B):
        os.makedirs(os.path.join(storage_dir, run))
    process, url = start_server(storage_dir)
    try:
        runs = [(RUN_A, "a"), (RUN_B, "b")]
        assert autoload(url, CURVES, auth.make_compare_token(SECRET, 3, runs, CURVES))[0] == 200
        assert autoload(url, IMAGES, auth.make_compare_token(SECRET, 3, runs, IMAGES,
                                                             "layer_activations"))[0] == 200
        assert autoload(url, IMAGES, auth.make_compare_token(SECRET, 3, runs, CURVES))[0] == 403
        assert autoload(url, CURVES,
                        auth.make_token(SECRET, 3, RUN_A, CURVES))[0] == 403
        assert autoload(url, "saliency_maps", auth.make_compare_token(
            SECRET, 3, runs, IMAGES, "saliency_maps"))[0] == 403
        assert autoload(url, CURVES)[0] == 403
    finally:
        assert stop_server(process) == 0


# --- overlaid curves -------------------------------------------------------------

def write_progress(run_dir, losses, val_losses=(), metrics=("loss", "accuracy")):
    rows = [[(i + 1) / len(losses), 0, i] + [loss, 1 - loss][:len(metrics)]
            for i, loss in enumerate(losses)]
    storage.append_rows(storage.results_path(run_dir, storage.TRAINING_PROGRESS_TABLE),
                        ["progress", "epoch", "batch"] + list(metrics), rows)
    if val_losses:
        storage.append_rows(storage.results_path(run_dir, storage.TRAINING_PROGRESS_VAL_TABLE),
                            ["epoch", "val_loss"], [[e + 1, v] for e, v in enumerate(val_losses)])


def lines_by_label(fig):
    """{legend label: the line renderer's data} of one figure."""
    return {item.label.value: [r for r in item.renderers if isinstance(r.glyph, Line)]
            for item in fig.legend[0].items}


def test_the_overlaid_curves_have_one_line_per_run_per_metric_named_by_the_run(storage_dir):
    runs = runs_of(storage_dir, "adam_3", "adam_2")
    write_progress(runs[0][0], [2.0, 1.0, 0.5], val_losses=[0.6])
    write_progress(runs[1][0], [2.3, 2.2, 2.3, 2.2], val_losses=[2.25])
    dashboard = compare.CompareCurves(runs)
    figures = dashboard.content.children
    assert [fig.title.text for fig in figures] == ["accuracy", "loss"]
    for fig in figures:
        lines = [r for r in fig.renderers if isinstance(r.glyph, Line)]
        assert len(lines) == 2
        assert [item.label.value for item in fig.legend[0].items] == list(LABELS)
        assert [line.glyph.line_color for line in lines] == list(auth.RUN_COLORS[:2])
        assert fig.x_range is dashboard.x_range  # one epoch axis for every metric
    loss = figures[1]
    by_label = lines_by_label(loss)
    assert by_label[LABELS[0]][0].data_source.data["loss"] == [2.0, 1.0, 0.5]
    assert by_label[LABELS[1]][0].data_source.data["progress"] == [0.25, 0.5, 0.75, 1.0]
    markers = [r for r in loss.renderers if isinstance(r.glyph, Scatter)]
    assert [(m.data_source.data["epoch"], m.data_source.data["val_loss"]) for m in markers] == [
        ([1.0], [0.6]), ([1.0], [2.25])]
    # validation markers join their run's legend entry instead of adding one
    assert [len(item.renderers) for item in loss.legend[0].items] == [2, 2]
    accuracy = figures[0]
    assert not [r for r in accuracy.renderers if isinstance(r.glyph, Scatter)]  # no val_accuracy


def test_the_overlaid_curves_grow_live_and_draw_a_run_that_starts_later(storage_dir):
    runs = runs_of(storage_dir, "adam_3", "adam_2")
    write_progress(runs[0][0], [2.0, 1.0])
    dashboard = compare.CompareCurves(runs)
    [loss] = [f for f in dashboard.content.select({"type": Plot}) if f.title.text == "loss"]
    assert list(lines_by_label(loss)) == [LABELS[0]]
    assert dashboard.message.text.startswith(LABELS[1] + ": Waiting for the script to start")
    storage.append_rows(storage.results_path(runs[0][0], storage.TRAINING_PROGRESS_TABLE),
                        ["progress", "epoch", "batch", "loss", "accuracy"], [[1.5, 1, 0, 0.7, 0.3]])
    write_progress(runs[1][0], [2.3])
    dashboard.update()
    [loss] = [f for f in dashboard.content.select({"type": Plot}) if f.title.text == "loss"]
    by_label = lines_by_label(loss)
    assert list(by_label) == list(LABELS)
    assert by_label[LABELS[0]][0].data_source.data["loss"] == [2.0, 1.0, 0.7]
    assert not dashboard.message.visible


def test_a_run_with_metrics_of_its_own_gets_its_line_only_where_it_has_them(storage_dir):
    runs = runs_of(storage_dir, "adam_3", "adam_2")
    write_progress(runs[0][0], [2.0, 1.0], metrics=("loss", "accuracy"))
    write_progress(runs[1][0], [2.0, 1.0], metrics=("loss",))
    dashboard = compare.CompareCurves(runs)
    titles = {f.title.text: f for f in dashboard.content.select({"type": Plot})}
    assert list(lines_by_label(titles["loss"])) == list(LABELS)
    assert list(lines_by_label(titles["accuracy"])) == [LABELS[0]]


def test_a_hostile_table_is_reported_for_its_run_and_the_other_run_is_drawn(storage_dir):
    runs = runs_of(storage_dir, "adam_3", "adam_2")
    write_progress(runs[0][0], [2.0, 1.0])
    os.makedirs(storage.results_dir(runs[1][0]))
    os.symlink("/etc/passwd", storage.results_path(runs[1][0], storage.TRAINING_PROGRESS_TABLE))
    dashboard = compare.CompareCurves(runs)
    assert dashboard.message.text.startswith(LABELS[1] + ": Could not read the training progress")
    [loss] = [f for f in dashboard.content.select({"type": Plot}) if f.title.text == "loss"]
    assert list(lines_by_label(loss)) == [LABELS[0]]


# --- images side by side under one slider ---------------------------------------------

def saliency(step):
    """A (28, 28, 1) map whose bright row is the step / 5: which snapshot is drawn shows."""
    result = np.zeros((28, 28, 1), np.uint8)
    result[step // 5, :] = 255
    return result


def write_snapshot(run_dir, stage, step, batches_per_epoch=20):
    storage.write_snapshot(run_dir, SALIENCY.results_file, {"digit.png": saliency(step)},
                           "digit.png", {"stage": stage, "epoch": step // batches_per_epoch,
                                         "batch": step % batches_per_epoch, "step": step},
                           {"digit.png": {"predicted_class": 3, "confidence": 0.5}})


class RecordingRender:
    """saliency_maps.render that records the step whose map it was asked to draw."""

    def __init__(self):
        self.steps = []

    def __call__(self, result, info, input_image, image_name):
        self.steps.append(int(np.argmax(result[:, :, 0].max(axis=1))) * 5)
        return saliency_maps.render(result, info, input_image, image_name)


@pytest.fixture
def image_runs(storage_dir):
    """Run adam_3 has snapshots every 10 steps (0..30), adam_2 every 15 (0..30)."""
    runs = runs_of(storage_dir, "adam_3", "adam_2")
    for stage, step in enumerate((0, 10, 20, 30)):
        write_snapshot(runs[0][0], stage, step)
    for stage, step in enumerate((0, 15, 30)):
        write_snapshot(runs[1][0], stage, step)
    return runs


def shown(dashboard):
    """[(step of the snapshot drawn, the panel's caption)] of every panel."""
    return [(panel.entries[int(panel.slider.value)]["step"], panel.label.text)
            for panel in dashboard.parts]


def test_the_shared_slider_runs_over_every_runs_steps_and_starts_at_the_newest(image_runs):
    dashboard = compare.CompareImages(image_runs, SALIENCY, saliency_maps.render)
    assert dashboard.steps == [0, 10, 15, 20, 30]
    assert dashboard.slider.visible and dashboard.slider.end == 4 and dashboard.slider.value == 4
    assert shown(dashboard) == [
        (30, "Step 30 \u00b7 epoch 2, batch 10 (snapshot 4 of 4)"),
        (30, "Step 30 \u00b7 epoch 2, batch 10 (snapshot 3 of 3)")]
    assert dashboard.step_text.text.startswith("Training step 30 (5 of 5 steps with snapshots)")


def test_the_shared_slider_shows_each_runs_nearest_snapshot_at_or_before_the_step(image_runs):
    renders = [RecordingRender(), RecordingRender()]
    dashboard = compare.CompareImages(image_runs, SALIENCY, saliency_maps.render)
    for panel, render in zip(dashboard.parts, renders):
        panel.render = render
    dashboard.slider.value = 3  # step 20
    assert shown(dashboard) == [
        (20, "Step 20 \u00b7 epoch 2, batch 0 (snapshot 3 of 4)"),
        (15, "Step 15 \u00b7 epoch 1, batch 15 (snapshot 2 of 3)")]
    assert [render.steps for render in renders] == [[20], [15]]  # what is drawn is that snapshot
    dashboard.slider.value = 1  # step 10
    assert [step for step, _ in shown(dashboard)] == [10, 0]
    assert [render.steps[-1] for render in renders] == [10, 0]
    assert dashboard.step_text.text == "Training step 10 (2 of 5 steps with snapshots)"


def test_a_run_without_a_snapshot_at_or_before_the_step_shows_its_first_and_says_so(storage_dir):
    runs = runs_of(storage_dir, "adam_3", "adam_2")
    for stage, step in enumerate((0, 10, 20)):
        write_snapshot(runs[0][0], stage, step)
    write_snapshot(runs[1][0], 1, 15)  # a history that starts later (stage 0 thinned or missing)
    dashboard = compare.CompareImages(runs, SALIENCY, saliency_maps.render)
    dashboard.slider.value = 1  # step 10
    (_, first), (step, second) = shown(dashboard)
    assert first.startswith("Step 10 ")
    assert step == 15 and second.endswith(
        "\nNo snapshot at or before step 10: its first is shown.")


def test_new_snapshots_move_the_panels_only_while_the_slider_is_at_the_newest(image_runs):
    dashboard = compare.CompareImages(image_runs, SALIENCY, saliency_maps.render)
    dashboard.slider.value = 3  # step 20: looking back
    write_snapshot(image_runs[0][0], 4, 40)
    dashboard.update()
    assert dashboard.steps == [0, 10, 15, 20, 30, 40]
    assert dashboard.slider.value == 3 and [s for s, _ in shown(dashboard)] == [20, 15]
    dashboard.slider.value = 5  # the newest: follow
    write_snapshot(image_runs[1][0], 3, 45)
    dashboard.update()
    assert dashboard.steps[-1] == 45 and dashboard.slider.value == 6
    assert [s for s, _ in shown(dashboard)] == [40, 45]
    assert dashboard.step_text.text.endswith("following the newest")


def test_the_image_choice_is_shared_by_every_panel(storage_dir):
    runs = runs_of(storage_dir, "adam_3", "adam_2")
    for run_dir, _ in runs:
        storage.write_snapshot(run_dir, SALIENCY.results_file,
                               {"a.png": saliency(0), "b.png": saliency(50)}, "b.png",
                               {"stage": 0, "epoch": 0, "batch": 0, "step": 0})
    renders = [RecordingRender(), RecordingRender()]
    dashboard = compare.CompareImages(runs, SALIENCY, saliency_maps.render)
    for panel, render in zip(dashboard.parts, renders):
        panel.render = render
    assert dashboard.image_select.visible and dashboard.image_select.options == ["a.png", "b.png"]
    dashboard.image_select.value = "a.png" if dashboard.image_select.value == "b.png" else "b.png"
    chosen = dashboard.image_select.value
    assert [panel.image_select.value for panel in dashboard.parts] == [chosen, chosen]
    assert [render.steps for render in renders] == [[0 if chosen == "a.png" else 50]] * 2


def test_a_refused_results_file_is_reported_in_its_panel_only(image_runs):
    os.remove(storage.snapshot_path(image_runs[1][0], SALIENCY.results_file,
                                    {"file": storage.snapshot_file_name(2)}))
    os.symlink("/etc/passwd", storage.snapshot_path(image_runs[1][0], SALIENCY.results_file,
                                                    {"file": storage.snapshot_file_name(2)}))
    dashboard = compare.CompareImages(image_runs, SALIENCY, saliency_maps.render)
    first, second = dashboard.parts
    assert not first.message.visible and first.content.children[0].select({"type": Plot})
    assert second.message.text.startswith("Refused to read a results file")


def test_the_comparison_stops_polling_once_every_run_has_ended(image_runs):
    from bokeh.document import Document
    dashboard = compare.CompareImages(image_runs, SALIENCY, saliency_maps.render)
    doc = Document()
    dashboard.attach(doc)
    assert len(doc.session_callbacks) == 1
    storage.write_run_status(image_runs[0][0], storage.RUN_FINISHED)
    dashboard.update()
    assert len(doc.session_callbacks) == 1  # the other run still goes
    storage.write_run_status(image_runs[1][0], storage.RUN_STOPPED)
    dashboard.update()
    assert doc.session_callbacks == []
