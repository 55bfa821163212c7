"""The saliency dashboard and the shared live machinery of snapshot dashboards."""
import os
import pathlib
import pickle
import types

import numpy as np
import pytest
from bokeh.document import Document
from bokeh.models import Div, ImageRGBA, Plot

from custom_bokeh import auth, saliency_maps
from custom_bokeh.dashboard import ImageDashboard, RunApplication, document_function
from custom_bokeh.images import to_rgba
from custom_keras import registry, storage

TECHNIQUE = registry.get("saliency_maps")
SECRET = "test-secret-key-for-saliency"
IMAGES = ("digit_3.png", "digit_7.png")  # digit_7.png is the newest visualization image


def saliency(stage, image_no):
    """A recognisable (28, 28, 1) map: a bright square that moves with stage and image."""
    result = np.zeros((28, 28, 1), np.uint8)
    result[stage:stage + 5, 10 * image_no:10 * image_no + 5] = 255
    return result


def write_stage(run_dir, stage):
    storage.write_snapshot(
        run_dir, TECHNIQUE.results_file,
        {name: saliency(stage, i) for i, name in enumerate(IMAGES)}, IMAGES[-1],
        {"stage": stage, "epoch": stage // 2, "batch": 10 * (stage % 2), "step": 10 * stage},
        {name: {"predicted_class": 3 + 4 * i, "confidence": 0.5 + 0.1 * stage}
         for i, name in enumerate(IMAGES)})


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "3" / "mnist_digits" / "runs" / "1"
    os.makedirs(run / "images")
    for mtime, name in enumerate(IMAGES):
        (run / "images" / name).write_bytes(b"png")
        os.utime(run / "images" / name, (1000 + mtime, 1000 + mtime))
    storage.write_input_images(str(run), {name: np.full((28, 28, 1), 40 * (i + 1), np.uint8)
                                          for i, name in enumerate(IMAGES)})
    return str(run)


class RecordingRender:
    """Wraps saliency_maps.render and records what it was asked to draw."""

    def __init__(self):
        self.calls = []

    def __call__(self, result, info, input_image, image_name):
        self.calls.append((int(np.argmax(result[:, :, 0].max(axis=1))), image_name))
        return saliency_maps.render(result, info, input_image, image_name)


def drawn(dashboard):
    """The figures the dashboard shows."""
    return list(dashboard.content.select({"type": Plot}))


def image_renderers(layout):
    return [r for fig in layout.select({"type": Plot}) for r in fig.renderers
            if isinstance(r.glyph, ImageRGBA)]


def test_render_links_input_and_map_and_names_the_prediction():
    result, input_image = saliency(4, 1), np.full((28, 28, 1), 90, np.uint8)
    layout = saliency_maps.render(result, {"predicted_class": 7, "confidence": 0.932},
                                  input_image, "digit_7.png")
    caption, figures = layout.children
    assert caption.text == "Predicted class 7 with confidence 93.2 %"
    original, saliency_figure = figures.children
    assert original.title.text == "Input: digit_7.png"
    assert saliency_figure.title.text == "Saliency map"
    assert saliency_figure.x_range is original.x_range
    assert saliency_figure.y_range is original.y_range
    [input_renderer] = image_renderers(original)
    [map_renderer] = image_renderers(saliency_figure)
    assert np.array_equal(map_renderer.data_source.data["image"][0], to_rgba(result))
    assert np.array_equal(input_renderer.data_source.data["image"][0], to_rgba(input_image))


def test_render_without_input_image_or_prediction():
    layout = saliency_maps.render(saliency(0, 0), {}, None, "x.png")
    caption, figures = layout.children
    assert caption.text == "No prediction recorded for this snapshot."
    assert [f.title.text for f in figures.children] == ["Saliency map"]


def test_dashboard_follows_new_snapshots_and_redraws_only_on_change(run_dir):
    write_stage(run_dir, 0)
    render = RecordingRender()
    dashboard = ImageDashboard(run_dir, TECHNIQUE, render)

    assert render.calls == [(0, "digit_7.png")]
    assert dashboard.label.text == "Snapshot 1 of 1 \u00b7 epoch 1, batch 0"
    assert dashboard.image_select.options == list(IMAGES) and dashboard.image_select.visible
    assert dashboard.image_select.value == "digit_7.png"
    assert not dashboard.slider.visible and not dashboard.message.visible
    assert "Predicted class 7 with confidence 50.0 %" in [
        d.text for d in dashboard.content.select({"type": Div})]

    dashboard.update()  # nothing new: nothing redrawn
    assert len(render.calls) == 1

    write_stage(run_dir, 1)
    dashboard.update()
    assert render.calls[-1] == (1, "digit_7.png") and len(render.calls) == 2
    assert dashboard.slider.visible and (dashboard.slider.end, dashboard.slider.value) == (1, 1)
    assert dashboard.label.text.startswith("Snapshot 2 of 2")

    # scrubbing back stops following; a new snapshot then only extends the slider
    dashboard.slider.value = 0
    assert render.calls[-1] == (0, "digit_7.png")
    write_stage(run_dir, 2)
    dashboard.update()
    assert (dashboard.slider.end, dashboard.slider.value) == (2, 0)
    assert len(render.calls) == 3 and dashboard.label.text.startswith("Snapshot 1 of 3")

    dashboard.image_select.value = "digit_3.png"
    assert render.calls[-1] == (0, "digit_3.png")
    dashboard.slider.value = 2  # back at the newest: following again
    write_stage(run_dir, 3)
    dashboard.update()
    assert render.calls[-1] == (3, "digit_3.png")


def test_the_slider_is_captioned_by_the_shown_stage(run_dir):
    for stage in range(3):
        write_stage(run_dir, stage)
    dashboard = ImageDashboard(run_dir, TECHNIQUE, saliency_maps.render)
    # No bare "Snapshot:" header (Bokeh shows a title as "title: value"): the label is the
    # caption, right above the slider.
    assert dashboard.slider.title == "" and not dashboard.slider.show_value
    children = dashboard.layout.children
    slider_row = next(c for c in children if dashboard.slider in getattr(c, "children", []))
    assert children.index(dashboard.label) == children.index(slider_row) - 1
    assert dashboard.label.visible and dashboard.slider.visible
    assert dashboard.label.text == "Snapshot 3 of 3 \u00b7 epoch 2, batch 0"

    dashboard.slider.value = 1  # the user drags the slider
    assert dashboard.label.text == "Snapshot 2 of 3 \u00b7 epoch 1, batch 10"
    write_stage(run_dir, 3)  # a new snapshot arrives
    dashboard.update()
    assert dashboard.label.text == "Snapshot 2 of 4 \u00b7 epoch 1, batch 10"
    dashboard.slider.value = 3
    assert dashboard.label.text == "Snapshot 4 of 4 \u00b7 epoch 2, batch 10"


def test_a_snapshot_of_the_same_shape_is_copied_into_the_shown_layout(run_dir):
    write_stage(run_dir, 0)
    dashboard = ImageDashboard(run_dir, TECHNIQUE, saliency_maps.render)
    [shown] = dashboard.content.children
    saliency_figure = shown.children[1].children[1]
    saliency_figure.x_range.start = 5  # the user zoomed in

    write_stage(run_dir, 1)
    dashboard.update()
    assert dashboard.content.children == [shown]
    [map_renderer] = [r for r in saliency_figure.renderers if isinstance(r.glyph, ImageRGBA)]
    assert np.array_equal(map_renderer.data_source.data["image"][0], to_rgba(saliency(1, 1)))
    assert shown.children[0].text == "Predicted class 7 with confidence 60.0 %"
    assert saliency_figure.x_range.start == 5

    # a layout built differently (no input image any more) replaces the shown one
    os.remove(storage.results_path(run_dir, storage.INPUT_IMAGES_FILE))
    write_stage(run_dir, 2)
    dashboard.update()
    [new_layout] = dashboard.content.children
    assert new_layout is not shown
    assert [f.title.text for f in new_layout.children[1].children] == ["Saliency map"]


def test_a_rewritten_snapshot_file_is_drawn_again(run_dir):
    write_stage(run_dir, 0)
    render = RecordingRender()
    dashboard = ImageDashboard(run_dir, TECHNIQUE, render)
    path = os.path.join(storage.history_dir(run_dir, TECHNIQUE.results_file), "000000000.pickle")
    snapshot = storage.safe_load(run_dir, path)
    snapshot["images"]["digit_7.png"] = saliency(9, 1)
    storage.atomic_write_pickle(path, snapshot)
    os.utime(path, ns=(os.stat(path).st_mtime_ns + 10 ** 9,) * 2)
    dashboard.update()
    assert render.calls == [(0, "digit_7.png"), (9, "digit_7.png")]


def test_a_technique_the_script_did_not_register_names_the_register_call(run_dir):
    storage.write_techniques(run_dir, {"training_progress": {"state": "active"}})
    dashboard = ImageDashboard(run_dir, TECHNIQUE, saliency_maps.render)
    assert dashboard.message.visible
    assert dashboard.message.text == (
        "Not registered: this run's script does not register the saliency maps. Add:\n"
        "callbacks.register_saliency_maps()")
    assert not drawn(dashboard)


class CreatesFile:
    """Unpickling this with plain pickle.load would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_results_file_is_refused_and_never_run(run_dir, tmp_path):
    marker = str(tmp_path / "pwned")
    folder = storage.history_dir(run_dir, TECHNIQUE.results_file)
    storage.atomic_write_bytes(os.path.join(folder, "000000000.pickle"),
                               pickle.dumps({"tags": {}, "images": {"digit_7.png": CreatesFile(
                                   marker)}, "info": {}}))
    storage.append_line(os.path.join(folder, storage.HISTORY_INDEX),
                        '{"stage": 0, "epoch": 0, "batch": 0, "step": 0, "file": "000000000.pickle"}')
    dashboard = ImageDashboard(run_dir, TECHNIQUE, saliency_maps.render)
    dashboard.update()

    assert dashboard.message.visible
    assert dashboard.message.text.startswith("Refused to read a results file: refused to load ")
    assert "only numpy arrays and plain containers" in dashboard.message.text
    assert not drawn(dashboard)
    assert not os.path.exists(marker)


def test_a_malicious_input_images_file_is_refused(run_dir, tmp_path):
    write_stage(run_dir, 0)
    marker = str(tmp_path / "pwned")
    storage.atomic_write_bytes(storage.results_path(run_dir, storage.INPUT_IMAGES_FILE),
                               pickle.dumps({"digit_7.png": CreatesFile(marker)}))
    dashboard = ImageDashboard(run_dir, TECHNIQUE, saliency_maps.render)
    assert dashboard.message.text.startswith("Refused to read a results file: refused to load ")
    assert not os.path.exists(marker)


def test_a_result_in_the_wrong_format_is_reported(run_dir):
    storage.write_snapshot(run_dir, TECHNIQUE.results_file, {"digit_7.png": "not an image"},
                           "digit_7.png", {"stage": 0, "epoch": 0, "batch": 0, "step": 0})
    dashboard = ImageDashboard(run_dir, TECHNIQUE, saliency_maps.render)
    assert dashboard.message.text.startswith("Could not show the saliency maps of image digit_7.png")


def test_polling_stops_after_a_last_read_once_the_run_ended(run_dir):
    write_stage(run_dir, 0)
    dashboard = ImageDashboard(run_dir, TECHNIQUE, saliency_maps.render)
    doc = Document()
    dashboard.attach(doc)
    assert len(doc.session_callbacks) == 1
    write_stage(run_dir, 1)
    storage.write_run_status(run_dir, "failed", 1, "killed")
    dashboard.update()
    assert doc.session_callbacks == []
    assert dashboard.label.text.startswith("Snapshot 2 of 2")


def test_play_steps_through_the_history_and_stops_at_the_end(run_dir):
    for stage in range(3):
        write_stage(run_dir, stage)
    dashboard = ImageDashboard(run_dir, TECHNIQUE, saliency_maps.render)
    doc = Document()
    dashboard.attach(doc)
    dashboard.play.active = True
    assert dashboard.slider.value == 0 and dashboard.play.label == "Pause"
    assert len(doc.session_callbacks) == 2
    dashboard._step()
    dashboard._step()
    assert dashboard.slider.value == 2
    dashboard._step()
    assert not dashboard.play.active and len(doc.session_callbacks) == 1


def session_document(token, application):
    """A document whose session context looks like the server's for this token."""
    doc = Document()
    context = types.SimpleNamespace(id=token, server_context=types.SimpleNamespace(
        application_context=types.SimpleNamespace(application=application)))
    doc._session_context = lambda: context
    return doc


def test_make_document_shows_the_run_of_the_token(run_dir):
    write_stage(run_dir, 0)
    storage_dir = str(pathlib.Path(run_dir).parents[3])  # <storage>/3/mnist_digits/runs/1
    make_document = document_function(registry.get("saliency_maps"))
    application = RunApplication(make_document, storage_dir, SECRET, "saliency_maps")
    doc = session_document(auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", "saliency_maps"),
                           application)
    make_document(doc)
    assert doc.title == "Saliency maps"
    assert len(image_renderers(doc.roots[0])) == 2

    forged = session_document(auth.make_token("other key", 3, "3/mnist_digits/runs/1",
                                              "saliency_maps"), application)
    make_document(forged)
    assert [root.text[:16] for root in forged.roots] == ["Access refused: "]


def test_snapshots_thinned_out_of_the_bounded_history_leave_the_slider(run_dir):
    for stage in range(6):
        write_stage(run_dir, stage)
    render = RecordingRender()
    dashboard = ImageDashboard(run_dir, TECHNIQUE, render)
    dashboard.slider.value = 4  # the user looks at stage 4, not following the newest
    storage.thin_history(run_dir, TECHNIQUE.results_file, list(range(6)), limit=4)
    kept = storage.stages_to_keep(list(range(6)), 4)
    dashboard.update()

    assert [entry["stage"] for entry in dashboard.entries] == kept
    assert dashboard.slider.end == len(kept) - 1
    assert dashboard.entries[int(dashboard.slider.value)]["stage"] == 4  # still on stage 4
    assert render.calls[-1] == (4, "digit_7.png")
    assert not dashboard.message.visible  # no "Could not read" of a deleted snapshot
