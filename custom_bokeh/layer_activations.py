"""Layer activations dashboard: the input, then every layer's output as one tiled image.

A convolutional layer's (filters, H, W) output becomes one grid of grey maps
separated by thin borders; a dense layer's (units,) output one strip of pixels,
wrapped into rows when long; a sequence layer's (filters, T) output one filter x
time heat map. A sequence input is drawn as curves per channel, a tabular input
as bars per feature. Each layer is a single image glyph (a layer of 512
filters stays fast) with an invisible rectangle per filter or unit, so hovering
names the filter or unit under the mouse and outlines it.
"""
import numpy as np
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, HoverTool

from custom_bokeh import charts, images
from custom_bokeh.dashboard import MAX_DRAWN_MAPS, TooMuchToDraw

UNITS_PER_ROW = 32  # a dense layer of 128 units becomes 4 rows of 32 pixels
UNIT_SCALE = 16  # screen pixels per unit of a dense layer
MAX_UNIT_SCALE = 40
MIN_STRIP_WIDTH = 320
MAX_SHEET_SCALE = 5
MAX_WIDTH = 900  # screen pixels
HIGHLIGHT_COLOR = "#f59e0b"


def render(result, info, input_image, image_name):
    """The layout of one layer activations snapshot.

    Args:
        result: [(layer name, uint8 (filters, H, W) or (units,)), ...] (Appendix D.2).
        info: unused; this technique records no per-image info.
        input_image: uint8 (H, W, C) image as fed to the model, float (T, C) or (F,)
            input of a sequence or tabular model, or None.
        image_name: the visualization input's name.
    """
    if not isinstance(result, (list, tuple)):
        raise ValueError("layer activations must be a list of (layer name, array) pairs, got %s"
                         % type(result).__name__)
    for position, entry in enumerate(result):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise ValueError("layer activations entry %d must be a (layer name, array) pair, got %r"
                             % (position, entry))
    maps = sum(map_count(activations) for _, activations in result)
    if maps > MAX_DRAWN_MAPS:
        raise TooMuchToDraw("its layers hold %d feature maps and units; the dashboard draws at "
                            "most %d" % (maps, MAX_DRAWN_MAPS))
    figures = []
    if charts.input_kind_of(input_image):
        figures.append(charts.input_figure(input_image, image_name))
    elif input_image is not None:
        figures.append(images.image_figure(input_image, "Input: %s" % image_name))
    for layer_name, activations in result:
        figures.append(layer_figure(str(layer_name), activations))
    return column(*figures, spacing=12)


def map_count(activations):
    """How many maps (filters) or units a layer's output draws, each with its hover rectangle."""
    shape = np.shape(activations)
    return 1 if len(shape) == 2 else (shape[0] if shape else 0)


def layer_figure(layer_name, activations):
    """One layer's output as one image with a hover naming the filter or unit.

    Args:
        layer_name: e.g. "Layer 1: conv2d".
        activations: uint8 (filters, H, W), (H, W) or (units,).
    """
    activations = np.asarray(activations)
    shape = " \u00d7 ".join(str(n) for n in activations.shape)
    if activations.ndim == 1:
        return _dense_figure("%s \u2014 %s units" % (layer_name, shape), activations)
    if activations.ndim not in (2, 3) or 0 in activations.shape:
        raise ValueError("activations of %s must have shape (filters, H, W) or (units,), got %s"
                         % (layer_name, activations.shape))
    if activations.ndim == 2:  # a sequence layer's (filters, time steps) output
        return charts.heatmap_figure(activations, "%s \u2014 %d filters \u00d7 %d time steps"
                                     % ((layer_name,) + activations.shape))
    return _maps_figure("%s \u2014 %s (filters \u00d7 H \u00d7 W)" % (layer_name, shape),
                        activations)


def _maps_figure(title, maps):
    count, height, width = maps.shape
    # a wide grid (about 2:1) keeps a layer on one screen without scrolling
    columns = images.grid_columns(count, height, width, aspect=2.0)
    sheet = images.tile(maps, columns=columns)
    # at most 5 screen pixels per pixel, so borders stay thin; a wider sheet is shrunk to fit
    scale = min(MAX_SHEET_SCALE, MAX_WIDTH / sheet.shape[1])
    scale = int(scale) if scale >= 1 else scale
    plot = images.image_figure(sheet, title, scale=scale)
    _add_hover(plot, sheet.shape[0], count, columns, height, width, border=1, label="filter",
               values=maps.reshape(count, -1).max(axis=1), value_label="max")
    return plot


def _dense_figure(title, units):
    if units.dtype != np.uint8 or units.size == 0:
        raise ValueError("dense activations must be a non-empty uint8 array, got %s of shape %s"
                         % (units.dtype, units.shape))
    count = units.size
    columns = min(count, max(UNITS_PER_ROW, images.grid_columns(count, aspect=2.0)))
    strip = images.tile(units.reshape(count, 1, 1), columns=columns, border=0)
    # short vectors (e.g. 10 classes) get bigger pixels so the strip is wide enough for its title
    scale = max(1, min(max(UNIT_SCALE, MIN_STRIP_WIDTH // columns), MAX_UNIT_SCALE,
                       MAX_WIDTH // columns))
    plot = images.image_figure(strip, title, scale=scale)
    _add_hover(plot, strip.shape[0], count, columns, 1, 1, border=0, label="unit",
               values=units, value_label="activation")
    return plot


def _add_hover(plot, sheet_height, count, columns, height, width, border, label, values,
               value_label):
    """Invisible rectangles over each tile of the sheet, outlined and named on hover."""
    tops, lefts = np.array([images.tile_origin(i, columns, height, width, border)
                            for i in range(count)]).T
    source = ColumnDataSource({
        "x": lefts + width / 2, "y": sheet_height - tops - height / 2,
        "index": np.arange(count), "value": np.asarray(values, dtype=int)})
    rects = plot.rect(x="x", y="y", width=width, height=height, source=source,
                      fill_alpha=0, line_alpha=0, hover_fill_alpha=0, hover_line_alpha=1,
                      hover_line_color=HIGHLIGHT_COLOR, hover_line_width=2)
    plot.add_tools(HoverTool(renderers=[rects],
                             tooltips="%s @index, %s @value" % (label, value_label),
                             point_policy="follow_mouse"))
