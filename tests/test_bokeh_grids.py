"""The layer activations, deconvolutional network and deep visualization dashboards."""
import os
import pathlib
import types

import numpy as np
import pytest
from bokeh.document import Document
from bokeh.models import GridPlot, HoverTool, ImageRGBA, Plot, Rect, SaveTool

from custom_bokeh import auth, deconvolutional_network, deep_visualization, images
from custom_bokeh import layer_activations
from custom_bokeh.dashboard import ImageDashboard, RunApplication, document_function
from custom_keras import registry, storage

SECRET = "test-secret-key-for-grids"
IMAGE = "digit_5.png"
RNG = np.random.default_rng(0)


def random_uint8(*shape):
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def reference_activations(stage=0):
    """Appendix D.2 output of the reference network; ``stage`` marks filter 0 of layer 1."""
    layers = [("Layer 1: conv2d", random_uint8(32, 26, 26)),
              ("Layer 2: conv2d_1", random_uint8(32, 24, 24)),
              ("Layer 3: max_pooling2d", random_uint8(32, 12, 12)),
              ("Layer 6: dense", random_uint8(128)),
              ("Layer 8: dense_1", random_uint8(64)),
              ("Layer 9: dense_2", random_uint8(10))]
    layers[0][1][0] = stage
    return layers


def image_renderers(layout):
    return [r for plot in layout.select({"type": Plot}) for r in plot.renderers
            if isinstance(r.glyph, ImageRGBA)]


def shown_image(plot):
    [renderer] = [r for r in plot.renderers if isinstance(r.glyph, ImageRGBA)]
    return renderer.data_source.data["image"][0]


def hover_source(plot):
    [renderer] = [r for r in plot.renderers if isinstance(r.glyph, Rect)]
    return renderer.data_source.data


# --- layer activations -----------------------------------------------------------------

def test_layer_activations_show_the_input_then_every_layer_as_one_image():
    layers = reference_activations()
    input_image = random_uint8(28, 28, 1)
    layout = layer_activations.render(layers, {}, input_image, IMAGE)
    figures = layout.children
    assert [f.title.text for f in figures] == [
        "Input: digit_5.png",
        "Layer 1: conv2d \u2014 32 \u00d7 26 \u00d7 26 (filters \u00d7 H \u00d7 W)",
        "Layer 2: conv2d_1 \u2014 32 \u00d7 24 \u00d7 24 (filters \u00d7 H \u00d7 W)",
        "Layer 3: max_pooling2d \u2014 32 \u00d7 12 \u00d7 12 (filters \u00d7 H \u00d7 W)",
        "Layer 6: dense \u2014 128 units", "Layer 8: dense_1 \u2014 64 units",
        "Layer 9: dense_2 \u2014 10 units"]
    assert len(image_renderers(layout)) == 7  # one image glyph per layer
    assert np.array_equal(shown_image(figures[0]), images.to_rgba(input_image))
    # 32 maps in a wide grid of 8 x 4, exactly the tiled activations
    assert np.array_equal(shown_image(figures[1]),
                          images.to_rgba(images.tile(layers[0][1], columns=8)))
    assert shown_image(figures[1]).shape == (4 * 27 + 1, 8 * 27 + 1)
    # 128 dense units: 4 rows of 32 pixels, no borders
    assert np.array_equal(shown_image(figures[4]), images.to_rgba(
        images.tile(layers[3][1].reshape(128, 1, 1), columns=32, border=0)))
    assert shown_image(figures[6]).shape == (1, 10)


def test_hover_names_the_filter_under_the_mouse():
    maps = random_uint8(32, 26, 26)
    plot = layer_activations.layer_figure("Layer 1: conv2d", maps)
    data = hover_source(plot)
    assert list(data["index"]) == list(range(32))
    assert list(data["value"]) == [int(m.max()) for m in maps]
    # filter 9 is in grid row 1 (from the top), column 1; Bokeh's y axis points up
    sheet_height = 4 * 27 + 1
    assert (data["x"][9], data["y"][9]) == (1 + 27 + 13, sheet_height - (1 + 27) - 13)
    [hover] = [t for t in plot.toolbar.tools if isinstance(t, HoverTool)]
    assert hover.tooltips == "filter @index, max @value"


def test_hover_names_the_unit_of_a_dense_layer():
    units = np.arange(64, dtype=np.uint8)
    plot = layer_activations.layer_figure("Layer 8: dense_1", units)
    data = hover_source(plot)
    assert list(data["value"]) == list(range(64))
    assert (data["x"][33], data["y"][33]) == (1.5, 0.5)  # second row of 32 is the bottom one
    [hover] = [t for t in plot.toolbar.tools if isinstance(t, HoverTool)]
    assert hover.tooltips == "unit @index, activation @value"


def test_a_layer_of_512_filters_is_one_image_glyph():
    maps = random_uint8(512, 4, 4)
    layout = layer_activations.render([("Layer 4: conv2d_big", maps)], {}, None, IMAGE)
    [plot] = layout.children
    [image] = image_renderers(layout)
    assert image.data_source.data["image"][0].shape == (16 * 5 + 1, 32 * 5 + 1)
    assert len(hover_source(plot)["index"]) == 512
    assert plot.frame_width <= layer_activations.MAX_WIDTH


def test_a_layer_of_large_maps_is_shrunk_to_the_page_width():
    maps = np.zeros((64, 224, 224), np.uint8)
    plot = layer_activations.layer_figure("Layer 1: block1_conv1", maps)
    assert shown_image(plot).shape == (6 * 225 + 1, 12 * 225 + 1)
    assert plot.frame_width == layer_activations.MAX_WIDTH
    assert plot.frame_height == round((6 * 225 + 1) * layer_activations.MAX_WIDTH / (12 * 225 + 1))


@pytest.mark.parametrize("result, message", [
    ("not a list", "layer activations must be a list of (layer name, array) pairs, got str"),
    ([("Layer 1: conv2d",)], "layer activations entry 0 must be a (layer name, array) pair"),
    ([("Layer 1: conv2d", np.zeros((2, 2, 2, 2), np.uint8))],
     "activations of Layer 1: conv2d must have shape (filters, H, W) or (units,), "
     "got (2, 2, 2, 2)"),
    ([("Layer 2: lstm", np.zeros((0, 5), np.uint8))],
     "activations of Layer 2: lstm must have shape (filters, H, W) or (units,), got (0, 5)"),
    ([("Layer 6: dense", np.zeros(4, np.float64))],
     "dense activations must be a non-empty uint8 array, got float64"),
])
def test_layer_activations_in_the_wrong_format_are_named(result, message):
    with pytest.raises(ValueError) as error:
        layer_activations.render(result, {}, None, IMAGE)
    assert message in str(error.value)


# --- deconvolutional network -------------------------------------------------------------

def deconvolution_result(stage=0):
    return [(np.full((28, 28, 1), stage + i, np.uint8), "max_pooling2d", no)
            for i, no in enumerate([5, 10, 22, 3])]


def test_deconvolution_grid_titles_links_and_saves_all_reconstructions():
    result = deconvolution_result()
    input_image = random_uint8(28, 28, 1)
    grid = deconvolutional_network.render(result, {}, input_image, IMAGE)
    assert isinstance(grid, GridPlot)
    figures = [child for child, _, _ in grid.children]
    assert [f.title.text for f in figures] == [
        "Input: digit_5.png", "#5 in max_pooling2d", "#10 in max_pooling2d",
        "#22 in max_pooling2d", "#3 in max_pooling2d"]
    assert np.array_equal(shown_image(figures[0]), images.to_rgba(input_image))
    for plot, (reconstruction, _, _) in zip(figures[1:], result):
        assert np.array_equal(shown_image(plot), images.to_rgba(reconstruction))
        assert plot.x_range is figures[0].x_range and plot.y_range is figures[0].y_range
    [save] = [t for t in grid.toolbar.tools if isinstance(t, SaveTool)]
    assert save.filename == "deconvolutional_network"


def test_deconvolution_of_rgb_images_without_input_image():
    result = [(random_uint8(32, 32, 3), "block1_conv2", 7)]
    grid = deconvolutional_network.render(result, {}, None, IMAGE)
    [(plot, _, _)] = grid.children
    assert plot.title.text == "#7 in block1_conv2"
    assert np.array_equal(shown_image(plot), images.to_rgba(result[0][0]))


def test_deconvolution_in_the_wrong_format_is_named():
    with pytest.raises(ValueError, match="deconvolutional network entry 0 must be an"):
        deconvolutional_network.render([(np.zeros((2, 2), np.uint8), "pool")], {}, None, IMAGE)


# --- deep visualization --------------------------------------------------------------------

def test_deep_visualization_titles_units_and_activations():
    result = [(random_uint8(28, 28, 1), "dense_2", 7, 12.34),
              (random_uint8(28, 28, 1), "dense_2", 8, 11761.4814453125),
              (random_uint8(28, 28, 1), "conv2d_1", (12, 12, 0), 0.0)]
    grid = deep_visualization.render(result, {}, None, "")
    figures = [child for child, _, _ in grid.children]
    assert [f.title.text for f in figures] == [
        "dense_2 unit 7", "dense_2 unit 8", "conv2d_1 unit (12, 12, 0)"]
    assert [[t.text for t in f.above if hasattr(t, "text")] for f in figures] == [
        ["activation 12.3"], ["activation 11761.5"], ["activation 0.0"]]
    for plot, (image, _, _, _) in zip(figures, result):
        assert np.array_equal(shown_image(plot), images.to_rgba(image))
    assert figures[2].x_range is figures[0].x_range


def test_activation_format():
    assert deep_visualization.format_activation(np.float32(-2.25)) == "-2.2"
    assert deep_visualization.format_activation(0.004321) == "0.00432"


def test_deep_visualization_in_the_wrong_format_is_named():
    with pytest.raises(ValueError, match="deep visualization results must be a non-empty list"):
        deep_visualization.render([], {}, None, "")


# --- live dashboards on a run folder --------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "3" / "mnist_digits" / "runs" / "1"
    os.makedirs(run / "images")
    (run / "images" / IMAGE).write_bytes(b"png")
    storage.write_input_images(str(run), {IMAGE: np.full((28, 28, 1), 77, np.uint8)})
    return str(run)


def write_stage(run_dir, technique, result, stage):
    storage.write_snapshot(run_dir, technique.results_file, {IMAGE: result}, IMAGE,
                           {"stage": stage, "epoch": 0, "batch": 10 * stage, "step": 10 * stage})


def session_document(token, application):
    """A document whose session context looks like the server's for this token."""
    doc = Document()
    context = types.SimpleNamespace(id=token, server_context=types.SimpleNamespace(
        application_context=types.SimpleNamespace(application=application)))
    doc._session_context = lambda: context
    return doc


def first_layer_sheet(result):
    return images.tile(result[0][1], columns=8)


def first_image(result):
    return result[0][0]


@pytest.mark.parametrize("module, result_of_stage, image_count, expected_image", [
    (layer_activations, reference_activations, 7, first_layer_sheet),
    (deconvolutional_network, deconvolution_result, 5, first_image),
    (deep_visualization, lambda stage: [(np.full((28, 28, 1), stage, np.uint8), "dense_2", 7,
                                         float(stage))], 1, first_image),
])
def test_the_declared_dashboard_shows_the_run_and_picks_up_a_new_snapshot(
        run_dir, module, result_of_stage, image_count, expected_image):
    technique = registry.get(module.__name__.rsplit(".", 1)[1])
    first, second = result_of_stage(0), result_of_stage(9)
    write_stage(run_dir, technique, first, 0)
    storage_dir = str(pathlib.Path(run_dir).parents[3])  # <storage>/3/mnist_digits/runs/1
    make_document = document_function(technique)
    doc = session_document(auth.make_token(SECRET, 3, "3/mnist_digits/runs/1", technique.key),
                           RunApplication(make_document, storage_dir, SECRET, technique.key))
    make_document(doc)
    assert doc.title == technique.title
    [page] = doc.roots
    assert len(image_renderers(page)) == image_count
    assert shows(page, expected_image(first)) and not shows(page, expected_image(second))
    [poll] = doc.session_callbacks  # the periodic callback

    write_stage(run_dir, technique, second, 1)
    poll.callback()
    assert len(image_renderers(page)) == image_count
    assert shows(page, expected_image(second)) and not shows(page, expected_image(first))


def shows(layout, image):
    """Whether one of the layout's image glyphs draws ``image``."""
    rgba = images.to_rgba(image)
    return any(np.array_equal(r.data_source.data["image"][0], rgba)
               for r in image_renderers(layout))


def test_dashboard_reports_a_result_it_cannot_draw(run_dir):
    technique = registry.get("layer_activations")
    write_stage(run_dir, technique, "not a list", 0)
    dashboard = ImageDashboard(run_dir, technique, layer_activations.render)
    assert dashboard.message.visible
    assert "layer activations must be a list of (layer name, array) pairs" in dashboard.message.text
