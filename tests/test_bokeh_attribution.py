"""The attribution dashboards: one method's overlay, and every method side by side."""
import os
import pathlib

import numpy as np
import pytest
from bokeh.models import ColorBar, CustomJS, Image, ImageRGBA, Plot, Slider

from custom_bokeh import attribution, attribution_methods, auth
from custom_bokeh.dashboard import ImageDashboard, RunApplication
from custom_keras import storage
from test_bokeh_saliency import SECRET, session_document

IMAGE = "digit_7.png"
RUN = "3/mnist_digits/runs/1"  # the run folder relative to the storage folder
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TECHNIQUES = {t.key: t for t in attribution_methods.attribution_techniques()}


def title(key):
    return TECHNIQUES[key].title


def a_map(signed, column=10):
    """A (28, 28) map with one bright column, recognisable after drawing."""
    result = np.full((28, 28), 128 if signed else 0, np.uint8)
    result[:, column] = 255
    return result


def predicted(probability=0.932):
    return {"class_index": 7, "class_source": "predicted", "probability": probability,
            "predicted_class": 7}


def write_stage(run_dir, key, step, result=None, info=None):
    result = result if result is not None else {"map": a_map(False, column=step % 28),
                                                "signed": False, "method": key}
    storage.write_snapshot(run_dir, TECHNIQUES[key].results_file, {IMAGE: result}, IMAGE,
                           {"stage": step, "epoch": step // 100, "batch": step % 100,
                            "step": step}, {IMAGE: info or predicted()})


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path.joinpath(*RUN.split("/"))
    os.makedirs(run / "images")
    (run / "images" / IMAGE).write_bytes(b"png")
    storage.write_input_images(str(run), {IMAGE: np.full((28, 28, 1), 90, np.uint8)})
    return str(run)


def glyphs(layout, kind):
    return [r.glyph for plot in layout.select({"type": Plot}) for r in plot.renderers
            if isinstance(r.glyph, kind)]


def overlay_of(plot):
    """The map renderer of an overlay figure."""
    renderer, = [r for r in plot.renderers if isinstance(r.glyph, Image)]
    return renderer


def heading(layout):
    return layout.children[0].text


# --- one method ----------------------------------------------------------------

@pytest.mark.parametrize("signed, palette", [(False, attribution.UNSIGNED_PALETTE),
                                             (True, attribution.SIGNED_PALETTE)])
def test_the_map_is_overlaid_on_its_image_with_the_colour_map_of_its_sign(signed, palette):
    layout = attribution.render({"map": a_map(signed), "signed": signed, "method": "grad_cam"},
                                predicted(), np.full((28, 28, 1), 90, np.uint8), IMAGE)
    overlay_plot, input_plot = layout.children[2].children
    assert isinstance(overlay_plot.renderers[0].glyph, ImageRGBA)  # the input, under the map
    overlay = overlay_of(overlay_plot).glyph
    drawn = overlay_of(overlay_plot).data_source.data["image"][0]
    np.testing.assert_array_equal(drawn[::-1], a_map(signed))  # rows flipped for Bokeh
    assert list(overlay.color_mapper.palette) == list(palette)
    assert (overlay.color_mapper.low, overlay.color_mapper.high) == (-0.5, 255.5)
    bar, = overlay_plot.select({"type": ColorBar})
    assert bar.color_mapper is overlay.color_mapper
    assert bar.major_label_overrides[128 if signed else 255] == ("0" if signed else "max")
    assert input_plot.title.text == "Input: %s" % IMAGE
    assert input_plot.x_range is overlay_plot.x_range and input_plot.y_range is overlay_plot.y_range


def test_the_signed_palette_is_clear_at_zero_blue_below_and_red_above():
    palette = attribution.SIGNED_PALETTE
    assert len(palette) == 256 and palette[128] == "#f7f7f700"   # RdBu's white, transparent
    assert palette[0] == "#053061ff" and palette[255].startswith("#6")
    assert palette[255].endswith("ff") and palette[96].endswith("80")


def test_the_opacity_slider_changes_the_overlay_in_the_browser():
    layout = attribution.render({"map": a_map(False), "signed": False, "method": "grad_cam"},
                                predicted(), np.full((28, 28, 1), 90, np.uint8), IMAGE)
    slider, = layout.select({"type": Slider})
    callback, = slider.js_property_callbacks["change:value"]
    overlay, = glyphs(layout, Image)
    assert isinstance(callback, CustomJS) and callback.args["overlays"] == [overlay]
    assert "global_alpha = cb_obj.value" in callback.code
    assert overlay.global_alpha == slider.value == attribution.DEFAULT_OPACITY


@pytest.mark.parametrize("info, text", [
    (predicted(), "Explains class 7 (predicted), probability 93.2 %"),
    (dict(predicted(0.004), class_index=3, class_source="fixed"),
     "Explains class 3 (chosen), probability 0.4 %; the model predicts class 7"),
    (dict(predicted(0.004), class_index=3, class_source="label", class_names=CLASS_NAMES),
     'Explains class 3 "three" (the true label), probability 0.4 %; '
     'the model predicts class 7 "seven"'),
    (dict(predicted(3e-5), class_index=3, class_source="fixed"),
     "Explains class 3 (chosen), probability below 0.1 %; the model predicts class 7"),
    (dict(predicted(), class_source="fixed"),
     "Explains class 7 (chosen), probability 93.2 %; the model predicts it too"),
    ({}, "The class this map explains is not recorded."),
    ({"class_index": "7; drop table", "probability": "x"},
     "The class this map explains is not recorded."),
])
def test_the_heading_names_the_class_explained_and_whether_predicted_or_chosen(info, text):
    layout = attribution.render({"map": a_map(True), "signed": True, "method": "lrp"}, info,
                                np.full((28, 28, 1), 90, np.uint8), IMAGE)
    assert heading(layout) == text


def test_guided_backprop_shows_guided_grad_cam_beside_it_and_rgb_maps_per_channel():
    rgb = np.stack([a_map(True, 3), a_map(True, 5), a_map(True, 7)], axis=2)
    layout = attribution.render({"map": rgb, "signed": True, "method": "guided_backprop",
                                 "guided_grad_cam": np.zeros((28, 28, 1), np.uint8)},
                                predicted(), np.full((28, 28, 3), 90, np.uint8), IMAGE)
    figures = layout.children[2].children
    assert [plot.title.text for plot in figures] == [
        "%s, signed" % title("guided_backprop"), "Input: %s" % IMAGE,
        "%s per colour channel" % title("guided_backprop"), "Guided Grad-CAM"]
    # the overlay keeps each pixel's strongest channel: the three bright columns
    overlay_values = overlay_of(figures[0]).data_source.data["image"][0]
    assert np.flatnonzero(overlay_values[0] == 255).tolist() == [3, 5, 7]


def test_a_tabular_input_gets_bars_per_named_feature_and_an_rgba_input_loses_its_alpha():
    layout = attribution.render({"values": np.array([0.5, -0.25], np.float32), "signed": True,
                                 "method": "integrated_gradients",
                                 "feature_names": ["age", "income"]},
                                predicted(), np.array([30, 1000], np.float32), "row")
    bars = layout.children[2]
    assert list(bars.x_range.factors) == ["age", "income"]
    layout = attribution.render({"map": a_map(False), "signed": False, "method": "grad_cam"},
                                predicted(), np.full((28, 28, 4), 90, np.uint8), IMAGE)
    assert [plot.title.text for plot in layout.children[2].children] == [
        "%s, unsigned" % title("grad_cam"), "Input: %s" % IMAGE]


def test_a_sequence_input_gets_its_attribution_values_as_curves():
    values = np.linspace(-1, 1, 40, dtype=np.float32).reshape(20, 2)
    layout = attribution.render({"values": values, "signed": True, "method": "smooth_grad"},
                                predicted(), np.zeros((20, 2), np.float32), "series")
    titles = [plot.title.text for plot in layout.children[1:]]
    assert titles == ["Input: series", "%s: attribution" % title("smooth_grad")]


@pytest.mark.parametrize("result, message", [
    ([1, 2], 'an attribution result must be a dict with "map" (or "values"), "signed" and '
             '"method", got list'),
    ({"signed": True}, 'the attribution result lacks "map" (or "values"), method'),
    ({"map": a_map(False).astype(np.float64), "signed": False, "method": "lrp"},
     '"map" must be a uint8 array (0..255), got float64'),
    ({"map": np.zeros((14, 14), np.uint8), "signed": False, "method": "lrp"},
     '"map" is 14 \u00d7 14 pixels but the input image is 28 \u00d7 28'),
    ({"map": np.zeros((28, 28, 2), np.uint8), "signed": False, "method": "lrp"},
     '"map" must have shape (H, W) or (H, W, 1 or 3), got (28, 28, 2)'),
    ({"map": a_map(False), "signed": "yes", "method": "lrp"},
     '"signed" must be True or False, got \'yes\''),
])
def test_a_hostile_result_is_reported_on_the_page(run_dir, result, message):
    write_stage(run_dir, "lrp", 10, result)
    dashboard = ImageDashboard(run_dir, TECHNIQUES["lrp"], attribution.render)
    assert dashboard.message.visible
    assert dashboard.message.text == "Could not show the %s of image %s: ValueError: %s" % (
        TECHNIQUES["lrp"].title.lower(), IMAGE, message)


@pytest.mark.parametrize("size, message", [
    (3000, "The %s of image digit_7.png is not drawn: it holds 9000000 array values; "
           "the dashboards draw at most 8388608." % title("occlusion").lower()),
    (10000, "Refused to read a results file: 000000010.pickle is larger than 32 MB"),
])
def test_a_huge_map_is_not_drawn_and_says_why(run_dir, size, message):
    write_stage(run_dir, "occlusion", 10, {"map": np.zeros((size, size), np.uint8),
                                           "signed": False, "method": "occlusion"})
    dashboard = ImageDashboard(run_dir, TECHNIQUES["occlusion"], attribution.render)
    assert dashboard.message.text == message
    assert not list(dashboard.content.select({"type": Plot}))


def test_the_users_opacity_and_zoom_stay_when_a_new_snapshot_arrives(run_dir):
    write_stage(run_dir, "grad_cam", 10)
    dashboard = ImageDashboard(run_dir, TECHNIQUES["grad_cam"], attribution.render)
    slider, = dashboard.content.select({"type": Slider})
    overlay, = glyphs(dashboard.content, Image)
    slider.value, overlay.global_alpha = 0.25, 0.25   # as the browser sends them
    plot = dashboard.content.children[0].children[2].children[0]
    plot.x_range.start, plot.x_range.end = 5, 15
    write_stage(run_dir, "grad_cam", 20)
    dashboard.update()
    assert list(dashboard.content.select({"type": Slider})) == [slider] and slider.value == 0.25
    assert glyphs(dashboard.content, Image) == [overlay] and overlay.global_alpha == 0.25
    assert (plot.x_range.start, plot.x_range.end) == (5, 15)
    drawn = overlay_of(plot).data_source.data["image"][0][::-1]
    assert np.flatnonzero(drawn[0] == 255).tolist() == [20]  # the new snapshot's column


# --- every method side by side ---------------------------------------------------

def register(run_dir, **states):
    """techniques.json with the given {key: (state, reason)}."""
    storage.write_techniques(run_dir, {key: {"registered": True, "state": state, "reason": reason,
                                             "interval": 10, "first_snapshot_step": 0}
                                       for key, (state, reason) in states.items()})


def panels(dashboard):
    return [panel for row_ in dashboard.content.children[0].children for panel in row_.children]


def panel_texts(dashboard):
    """The name and caption of each panel, as lines."""
    return ["%s\n%s" % (panel.children[0].text, panel.children[1].text)
            for panel in panels(dashboard)]


def panel_overlays(dashboard):
    """The overlay renderers of the panels, in the order shown."""
    return [overlay_of(panel.children[2]) for panel in panels(dashboard) if len(panel.children) > 2]


def test_the_side_by_side_view_shows_one_panel_per_method_with_results(run_dir):
    register(run_dir, grad_cam=("active", None), lrp=("active", None),
             occlusion=("switched_off", "needs an image: the input is a sequence"),
             score_cam=("waiting", None))
    write_stage(run_dir, "grad_cam", 10)
    write_stage(run_dir, "lrp", 10, {"map": a_map(True), "signed": True, "method": "lrp"},
                dict(predicted(0.004), class_index=3, class_source="fixed"))
    dashboard = attribution_methods.AttributionMethodsDashboard(
        run_dir, attribution_methods.attribution_techniques())
    texts = panel_texts(dashboard)
    assert texts == [
        "%s\nstep 10 (epoch 1, batch 10)\nExplains class 7 (predicted), probability 93.2 %%"
        % title("grad_cam"),
        "%s\nstep 10 (epoch 1, batch 10)\nExplains class 3 (chosen), probability 0.4 %%; "
        "the model predicts class 7" % title("lrp")]
    mappers = [list(o.glyph.color_mapper.palette) for o in panel_overlays(dashboard)]
    assert mappers == [list(attribution.UNSIGNED_PALETTE), list(attribution.SIGNED_PALETTE)]
    notes = dashboard.notes.text.split("\n")
    assert "%s: switched off: needs an image: the input is a sequence" % title("occlusion") \
        in notes
    assert "%s: Waiting for the first snapshot at batch 0 (then every 10 batches)." % title(
        "score_cam") in notes
    assert notes[-1] == "Not registered in this run: %s." % ", ".join(title(key) for key in (
        "grad_cam_plus_plus", "guided_backprop", "smooth_grad", "integrated_gradients"))
    callback = dashboard.opacity.js_property_callbacks["change:value"][0]
    assert callback.args["overlays"] == [o.glyph for o in panel_overlays(dashboard)]


def test_moving_the_stage_slider_shows_each_methods_nearest_snapshot_and_its_step(run_dir):
    register(run_dir, grad_cam=("active", None), lrp=("active", None))
    for step in (10, 20, 30):
        write_stage(run_dir, "grad_cam", step)
    write_stage(run_dir, "lrp", 15)
    dashboard = attribution_methods.AttributionMethodsDashboard(
        run_dir, attribution_methods.attribution_techniques())
    assert dashboard.label.text == "Stage 4 of 4 \u00b7 step 30"  # steps 10, 15, 20, 30

    def shown():
        columns = [int(np.flatnonzero(o.data_source.data["image"][0][::-1][0] == 255)[0])
                   for o in panel_overlays(dashboard)]
        return [text.split("\n")[1] for text in panel_texts(dashboard)], columns

    assert shown() == (["step 30 (epoch 1, batch 30)", "step 15 (epoch 1, batch 15)"], [2, 15])
    dashboard.slider.value = 1   # step 15
    assert shown() == (["step 10 (epoch 1, batch 10)", "step 15 (epoch 1, batch 15)"], [10, 15])
    dashboard.slider.value = 0   # step 10: LRP has nothing yet
    assert shown() == (["step 10 (epoch 1, batch 10)"], [10])
    assert "%s: no snapshot yet at this stage (the first is at step 15 (epoch 1, batch 15))" % (
        title("lrp")) in dashboard.notes.text
    assert not dashboard.follow_latest
    write_stage(run_dir, "lrp", 40)   # a new snapshot does not move a user who looks back
    dashboard.update()
    assert dashboard.slider.value == 0 and dashboard.slider.end == 4


def test_a_hostile_result_in_the_side_by_side_view_is_reported_in_its_panel(run_dir):
    register(run_dir, grad_cam=("active", None), lrp=("active", None))
    write_stage(run_dir, "grad_cam", 10)
    write_stage(run_dir, "lrp", 10, {"map": np.zeros((3000, 3000), np.uint8), "signed": True,
                                     "method": "lrp"})
    dashboard = attribution_methods.AttributionMethodsDashboard(
        run_dir, attribution_methods.attribution_techniques())
    texts = panel_texts(dashboard)
    assert texts[1].startswith("%s\nstep 10 (epoch 1, batch 10)\nNot drawn: it holds 9000784"
                               % title("lrp"))
    assert len(glyphs(dashboard.content, Image)) == 1


def test_a_run_without_attribution_methods_says_how_to_add_one(run_dir):
    register(run_dir, saliency_maps=("active", None))
    dashboard = attribution_methods.AttributionMethodsDashboard(
        run_dir, attribution_methods.attribution_techniques())
    assert dashboard.message.text.startswith("This run registers no attribution method. Add one "
                                             "or more of:\ncallbacks.register_grad_cam()")
    assert not list(dashboard.content.select({"type": Plot}))


def test_the_opacity_and_zoom_stay_when_the_stage_moves(run_dir):
    register(run_dir, grad_cam=("active", None))
    for step in (10, 20):
        write_stage(run_dir, "grad_cam", step)
    dashboard = attribution_methods.AttributionMethodsDashboard(
        run_dir, attribution_methods.attribution_techniques())
    overlay, = glyphs(dashboard.content, Image)
    dashboard.opacity.value = overlay.global_alpha = 0.2   # as the browser sends them
    dashboard.slider.value = 0
    assert glyphs(dashboard.content, Image) == [overlay] and overlay.global_alpha == 0.2
    write_stage(run_dir, "lrp", 15, {"map": a_map(True), "signed": True, "method": "lrp"})
    dashboard.update()   # a new panel: built anew, at the user's opacity
    assert [g.global_alpha for g in glyphs(dashboard.content, Image)] == [0.2]
    dashboard.slider.value = 2
    assert [g.global_alpha for g in glyphs(dashboard.content, Image)] == [0.2, 0.2]


def test_index_lines_that_are_not_snapshot_entries_are_ignored(run_dir):
    register(run_dir, grad_cam=("active", None))
    write_stage(run_dir, "grad_cam", 10)
    index = storage.history_index_path(run_dir, TECHNIQUES["grad_cam"].results_file)
    with open(index, "a") as lines:
        lines.write('[1, 2]\n"text"\n{"file": "000000099.pickle", "step": "soon"}\n'
                    '{"file": "000000010.pickle", "step": 12, "epoch": "%s", "batch": null}\n'
                    % ("x" * 10000))
    dashboard = attribution_methods.AttributionMethodsDashboard(
        run_dir, attribution_methods.attribution_techniques())
    assert dashboard.steps == [10, 12] and len(panel_overlays(dashboard)) == 1
    assert panel_texts(dashboard)[0].split("\n")[1] == "step 12 (epoch ?, batch ?)"


def test_a_failed_run_says_so_above_the_methods(run_dir):
    register(run_dir, grad_cam=("active", None))
    write_stage(run_dir, "grad_cam", 10)
    with open(storage.output_path(run_dir), "w") as output:
        output.write("Traceback (most recent call last):\n  File \"x.py\"\nMemoryError: out of memory\n")
    storage.write_run_status(run_dir, storage.RUN_FAILED, 1)
    dashboard = attribution_methods.AttributionMethodsDashboard(
        run_dir, attribution_methods.attribution_techniques())
    assert dashboard.message.text == "The run failed: MemoryError: out of memory"
    assert len(panel_overlays(dashboard)) == 1


def test_the_side_by_side_app_opens_the_run_of_its_token_and_stops_polling_once_ended(run_dir):
    register(run_dir, grad_cam=("active", None))
    write_stage(run_dir, "grad_cam", 10)
    storage_dir = str(pathlib.Path(run_dir).parents[3])  # <storage>/3/mnist_digits/runs/1
    application = RunApplication(attribution_methods.make_document, storage_dir, SECRET,
                                 attribution_methods.TECHNIQUE.key)
    doc = session_document(auth.make_token(SECRET, 3, RUN, attribution_methods.TECHNIQUE.key),
                           application)
    attribution_methods.make_document(doc)
    assert doc.title == "Attribution methods"
    assert len(glyphs(doc.roots[0], Image)) == 1
    assert len(doc.session_callbacks) == 1
    storage.write_run_status(run_dir, storage.RUN_FINISHED, 0)
    for callback in list(doc.session_callbacks):
        callback.callback()
    assert doc.session_callbacks == []

    other = session_document(auth.make_token(SECRET, 3, RUN, "grad_cam"),
                             application)
    attribution_methods.make_document(other)
    assert [root.text[:16] for root in other.roots] == ["Access refused: "]


def test_sequence_attributions_are_charts_one_a_row_without_an_opacity_slider(run_dir):
    register(run_dir, smooth_grad=("active", None), integrated_gradients=("active", None))
    storage.write_visualization_inputs(run_dir, {"series": np.zeros((20, 2), np.float32)})
    for key in ("smooth_grad", "integrated_gradients"):
        storage.write_snapshot(run_dir, TECHNIQUES[key].results_file, {"series": {
            "values": np.ones((20, 2), np.float32), "signed": True, "method": key}}, "series",
            {"stage": 0, "epoch": 0, "batch": 0, "step": 0}, {"series": predicted()})
    dashboard = attribution_methods.AttributionMethodsDashboard(
        run_dir, attribution_methods.attribution_techniques())
    rows = dashboard.content.children[0].children
    assert [len(row_.children) for row_ in rows] == [1, 1]
    assert [panel.children[2].title.text for panel in panels(dashboard)] == ["Attribution"] * 2
    assert not dashboard.opacity.visible
