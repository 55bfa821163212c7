"""Dashboards of sequence (T, C) and tabular (F,) models: curves, bars and heat maps."""

import numpy as np
import pytest
from bokeh.core.validation import check_integrity
from bokeh.document import Document
from bokeh.models import FactorRange, Image, Line, Plot, VBar

from custom_bokeh import (charts, deconvolutional_network, deep_visualization, layer_activations,
                          saliency_maps)
from custom_bokeh.dashboard import ImageDashboard
from custom_bokeh.gradients import GradientsDashboard
from custom_bokeh.training_progress import TrainingProgressDashboard
from custom_keras import registry, storage

RNG = np.random.default_rng(0)
FEATURES = ["age", "income", "rooms"]


def plots(layout):
    """The figures of a layout of columns and rows, top to bottom."""
    if isinstance(layout, Plot):
        return [layout]
    return [plot for child in getattr(layout, "children", []) for plot in plots(child)]


def lines_of(plot):
    return [r for r in plot.renderers if isinstance(r.glyph, Line)]


def bars_of(plot):
    [bars] = [r for r in plot.renderers if isinstance(r.glyph, VBar)]
    return bars.data_source.data


def sequence(steps=64, channels=2):
    return RNG.normal(size=(steps, channels)).astype(np.float32)


def write(run_dir, key, result, info=None, inputs=None):
    technique = registry.get(key)
    storage.write_snapshot(run_dir, technique.results_file, {"input_0": result}, "input_0",
                           {"stage": 0, "epoch": 0, "batch": 0, "step": 0},
                           {"input_0": info} if info else None)
    if inputs is not None:
        storage.write_visualization_inputs(run_dir, {"input_0": inputs})
    return technique


def test_a_sequence_layer_is_a_filter_by_time_heat_map():
    maps = RNG.integers(0, 256, (8, 60), dtype=np.uint8)
    plot = layer_activations.layer_figure("Layer 0: conv1d", maps)
    assert plot.title.text == "Layer 0: conv1d \u2014 8 filters \u00d7 60 time steps"
    [image] = [r for r in plot.renderers if isinstance(r.glyph, Image)]
    # filter f is row f, time step t column t: hovering (t, f) names that value
    assert np.array_equal(image.data_source.data["image"][0], maps)
    assert (image.glyph.x, image.glyph.y, image.glyph.dw, image.glyph.dh) == (-0.5, -0.5, 60, 8)
    assert (plot.xaxis.axis_label, plot.yaxis.axis_label) == ("time step", "filter")


def test_a_heat_map_of_many_filters_stays_on_the_screen():
    plot = charts.heatmap_figure(np.zeros((512, 100), np.uint8), "Layer 3: lstm")
    assert plot.frame_height == charts.MAX_HEATMAP_HEIGHT
    assert charts.heatmap_figure(np.zeros((8, 100), np.uint8), "x").frame_height == 8 * 24


def test_sequence_saliency_is_drawn_as_curves_over_time_per_channel():
    result = {"gradient": sequence(), "gradient_x_input": sequence(), "input": sequence()}
    layout = saliency_maps.render(result, {"predicted_class": 2, "confidence": 0.5}, None,
                                  "input_0")
    titles = [p.title.text for p in plots(layout)]
    assert titles == ["Input: input_0", "Gradient of the score over time",
                      "Gradient \u00d7 input over time"]
    for plot, key in zip(plots(layout), ("input", "gradient", "gradient_x_input")):
        curves = lines_of(plot)
        assert len(curves) == 2  # one per channel
        for channel, curve in enumerate(curves):
            assert np.allclose(curve.data_source.data["value"], result[key][:, channel])
            assert list(curve.data_source.data["time"]) == list(range(64))
    assert layout.children[0].text == "Predicted class 2 with confidence 50.0 %"


def test_tabular_saliency_is_bars_per_named_feature():
    result = {"gradient": np.array([0.5, -0.25, 0.0], np.float32),
              "gradient_x_input": np.array([1.0, 0.5, -2.0], np.float32),
              "input": np.array([2.0, -2.0, 1.0], np.float32), "feature_names": FEATURES}
    layout = saliency_maps.render(result, {"score": 0.734}, None, "input_0")
    shown = plots(layout)
    assert [p.title.text for p in shown] == ["Input: input_0", "Gradient of the score per feature",
                                            "Gradient \u00d7 input per feature"]
    for plot, key in zip(shown, ("input", "gradient", "gradient_x_input")):
        assert isinstance(plot.x_range, FactorRange) and list(plot.x_range.factors) == FEATURES
        data = bars_of(plot)
        assert list(data["feature"]) == FEATURES
        assert np.allclose(data["value"], result[key])
    assert layout.children[0].text == "Output score 0.734"


def test_features_without_names_are_numbered():
    plot = charts.bars_figure(np.ones(3, np.float32), "x", feature_names=["a", "a", "b"])
    assert list(plot.x_range.factors) == ["feature 0", "feature 1", "feature 2"]


def test_sequence_deconvolution_is_one_chart_of_curves_per_feature_map():
    reconstructions = [(sequence(), "conv1d_1", 4), (sequence(), "conv1d_1", 0)]
    layout = deconvolutional_network.render(reconstructions, {}, sequence(), "input_0")
    shown = plots(layout)
    assert [p.title.text for p in shown] == [
        "Input: input_0", "Feature map #4 in conv1d_1, reconstructed",
        "Feature map #0 in conv1d_1, reconstructed"]
    for plot, (values, _, _) in zip(shown[1:], reconstructions):
        assert np.allclose(lines_of(plot)[1].data_source.data["value"], values[:, 1])


def test_deep_visualization_of_a_tabular_model_is_the_synthetic_feature_vector():
    vectors = [(np.array([1.0, -1.0, 3.0], np.float32), "dense_2", 0, 2.28),
               (np.array([0.0, 2.0, -3.0], np.float32), "dense_2", 1, 0.73)]
    shown = plots(deep_visualization.render(vectors, {}, None, "input_0"))
    assert [p.title.text for p in shown] == ["dense_2 unit 0 \u00b7 activation 2.3",
                                            "dense_2 unit 1 \u00b7 activation 0.7"]
    for plot, (values, _, _, _) in zip(shown, vectors):
        assert np.allclose(bars_of(plot)["value"], values)


def test_deep_visualization_of_a_sequence_model_is_curves_per_channel():
    [plot] = plots(deep_visualization.render([(sequence(32, 3), "dense", 2, 0.5)], {}, None, "x"))
    assert len(lines_of(plot)) == 3


def test_the_dashboard_draws_the_float_input_of_a_sequence_model(tmp_path):
    run_dir = str(tmp_path)
    inputs = sequence()
    activations = [("Layer 0: conv1d", RNG.integers(0, 256, (8, 60), dtype=np.uint8)),
                   ("Layer 4: dense", RNG.integers(0, 256, 3, dtype=np.uint8))]
    technique = write(run_dir, "layer_activations", activations, inputs=inputs)
    dashboard = ImageDashboard(run_dir, technique, layer_activations.render)
    assert not dashboard.message.visible, dashboard.message.text
    [content] = dashboard.content.children
    shown = plots(content)
    assert shown[0].title.text == "Input: input_0"
    assert np.allclose(lines_of(shown[0])[0].data_source.data["value"], inputs[:, 0])
    assert [p.title.text for p in shown[1:]] == [
        "Layer 0: conv1d \u2014 8 filters \u00d7 60 time steps", "Layer 4: dense \u2014 3 units"]


def test_deep_visualization_shows_no_input_choice_that_changes_nothing(tmp_path):
    run_dir = str(tmp_path)
    technique = registry.get("deep_visualization")
    result = [(np.ones(3, np.float32), "dense", 0, 1.0)]
    storage.write_snapshot(run_dir, technique.results_file,
                           {"input_0": result, "input_1": result}, "input_1",
                           {"stage": 0, "epoch": 0, "batch": 0, "step": 0})
    dashboard = ImageDashboard(run_dir, technique, deep_visualization.render,
                               one_result_for_every_input=True)
    assert not dashboard.image_select.visible
    other = ImageDashboard(run_dir, registry.get("deep_visualization"), deep_visualization.render)
    assert other.image_select.visible and other.image_select.title == "Input"


PAGES_OF_THEIR_OWN = {"training_progress": TrainingProgressDashboard,
                      "gradients": GradientsDashboard}


@pytest.mark.parametrize("key", [t.key for t in registry.TECHNIQUES
                                 if t.render or t.key in PAGES_OF_THEIR_OWN])
def test_a_dashboard_without_results_makes_bokeh_warn_of_no_empty_layout(tmp_path, key):
    technique = registry.get(key)
    if technique.render is None:
        shown = PAGES_OF_THEIR_OWN[key](str(tmp_path))
    else:
        shown = ImageDashboard(str(tmp_path), technique, registry.load(technique.render))
    document = Document()
    document.add_root(shown.layout)
    issues = check_integrity(list(document.models))
    assert [issue.name for issue in issues.warning] == []  # EMPTY_LAYOUT among them
