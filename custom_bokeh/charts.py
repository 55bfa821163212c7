"""Charts of non-image inputs: curves over time per channel, bars per feature, heat maps.

A sequence input is float (T, C): T time steps of C channels, drawn as one curve
per channel. A tabular input is float (F,): F features, drawn as one bar per
feature, named by the script's ``feature_names`` when it gave them. A layer's
output over time is uint8 (filters, T), drawn as a filter x time heat map.
Titles wrap onto further lines instead of being cut off. This module imports no
keras.
"""
import numpy as np
from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Range1d
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from custom_bokeh.images import TITLE_STYLE

CHART_TOOLS = "pan,wheel_zoom,box_zoom,reset,save"
CURVE_WIDTH, CURVE_HEIGHT = 560, 170   # frame pixels of one curves chart
BAR_WIDTH = 64                         # frame pixels per feature
MIN_BAR_CHART_WIDTH, MAX_BAR_CHART_WIDTH = 360, 900
LABEL_CHARACTER_PIXELS = 7             # of an 11 px axis label
HEATMAP_WIDTH, MAX_HEATMAP_HEIGHT, MAX_ROW_PIXELS, MIN_ROW_PIXELS = 560, 480, 24, 3
POSITIVE_COLOR, NEGATIVE_COLOR = "#2b6cb0", "#c05621"
AXIS_ROOM = 72                         # pixels left of every frame: charts stacked line up
TITLE_CHARACTERS = 60                  # a longer title is wrapped at word boundaries


def input_kind_of(array):
    """"sequence" for a 2-D array (T, C), "tabular" for a 1-D array (F,), else None."""
    array = np.asarray(array)
    return {2: "sequence", 1: "tabular"}.get(array.ndim) if array.dtype.kind == "f" else None


def wrap_title(title, width=TITLE_CHARACTERS):
    """The title broken into lines of at most ``width`` characters (at spaces where possible)."""
    lines, line = [], ""
    for word in str(title).split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = "%s %s" % (line, word) if line else word
    lines.append(line)
    return "\n".join(lines)


def _chart(title, width, height, x_range=None, y_range=None, x_label=None, y_label=None):
    options = {} if x_range is None else {"x_range": x_range}
    if y_range is not None:
        options["y_range"] = y_range
    plot = figure(title=wrap_title(title), tools=CHART_TOOLS, frame_width=width,
                  frame_height=height, toolbar_location="above", min_border=4,
                  min_border_left=AXIS_ROOM,
                  outline_line_color="#9aa5b1", **options)
    plot.toolbar.logo = None
    plot.toolbar.autohide = True
    for name, value in TITLE_STYLE.items():
        setattr(plot.title, name, value)
    plot.xaxis.axis_label, plot.yaxis.axis_label = x_label, y_label
    return plot


def _finite(array, argument):
    array = np.asarray(array)
    if array.dtype.kind not in "fiu" or array.size == 0:
        raise ValueError("%s must be a non-empty numeric array, got %s of shape %s"
                         % (argument, array.dtype, array.shape))
    return np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def curves_figure(values, title, y_label="value", channel_names=None):
    """One curve per channel of a (T, C) array over the time steps, with a legend and hover.

    Args:
        values: float (T, C) (a (T,) array is one channel).
        title: the chart title.
        y_label: what the values are, e.g. "gradient".
        channel_names: optional names of the C channels; "channel <c>" otherwise.
    """
    values = _finite(values, title)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError("%s must have shape (time steps, channels), got %s" % (title, values.shape))
    steps, channels = values.shape
    plot = _chart(title, CURVE_WIDTH, CURVE_HEIGHT, x_label="time step", y_label=y_label)
    time = np.arange(steps)
    renderers = []
    for channel in range(channels):
        name = channel_names[channel] if channel_names else "channel %d" % channel
        source = ColumnDataSource({"time": time, "value": values[:, channel],
                                   "channel": [name] * steps})
        renderers.append(plot.line("time", "value", source=source, line_width=2,
                                   color=Category10_10[channel % 10], legend_label=name))
    # beside the frame, not over the curves
    legend = plot.legend[0]
    plot.center.remove(legend)
    plot.add_layout(legend, "right")
    legend.click_policy = "hide"
    legend.label_text_font_size = "11px"
    plot.add_tools(HoverTool(renderers=renderers, mode="vline",
                             tooltips="@channel, step @time: @value{0.0000}"))
    return plot


def feature_labels(count, feature_names=None):
    """The script's feature names when it gave one per feature, else "feature 0", "feature 1" ..."""
    if (isinstance(feature_names, (list, tuple)) and len(feature_names) == count
            and all(isinstance(name, str) for name in feature_names)):
        names = [name[:40] for name in feature_names]
        if len(set(names)) == count:  # a bar chart needs distinct names
            return names
    return ["feature %d" % i for i in range(count)]


def bars_figure(values, title, feature_names=None, y_label="value"):
    """One bar per feature of a (F,) array, positive and negative in two colours, with hover.

    Args:
        values: float (F,).
        title: the chart title.
        feature_names: optional names of the F features.
        y_label: what the values are.
    """
    values = _finite(values, title).reshape(-1)
    names = feature_labels(values.size, feature_names)
    width = int(np.clip(BAR_WIDTH * values.size, MIN_BAR_CHART_WIDTH, MAX_BAR_CHART_WIDTH))
    plot = _chart(title, width, CURVE_HEIGHT, x_range=FactorRange(*names, range_padding=0.1),
                  y_label=y_label)
    source = ColumnDataSource({"feature": names, "value": values,
                               "color": [POSITIVE_COLOR if v >= 0 else NEGATIVE_COLOR
                                         for v in values]})
    bars = plot.vbar(x="feature", top="value", width=0.8, color="color", source=source)
    # names that do not fit under their bar are turned, so that they do not run together
    if max(map(len, names)) * LABEL_CHARACTER_PIXELS > width / values.size:
        plot.xaxis.major_label_orientation = 0.8
    plot.xgrid.visible = False
    plot.add_tools(HoverTool(renderers=[bars], tooltips="@feature: @value{0.0000}"))
    return plot


def heatmap_figure(maps, title):
    """A layer's output over time, uint8 (filters, T), as a filter x time heat map with hover.

    Brighter is a higher activation, as in the image dashboards; filter 0 is the bottom row.
    """
    maps = np.asarray(maps)
    if maps.dtype != np.uint8 or maps.ndim != 2 or 0 in maps.shape:
        raise ValueError("%s must be a non-empty uint8 (filters, time steps) array, got %s of "
                         "shape %s" % (title, maps.dtype, maps.shape))
    filters, steps = maps.shape
    # 8 filters get 24 px rows; many filters thinner rows, the map at most MAX_HEATMAP_HEIGHT
    row_pixels = int(np.clip(MAX_ROW_PIXELS * 8 // filters, MIN_ROW_PIXELS, MAX_ROW_PIXELS))
    height = min(filters * row_pixels, MAX_HEATMAP_HEIGHT)
    # x from -0.5 so that time step t is drawn over [t - 0.5, t + 0.5] and hovers as t
    plot = _chart(title, HEATMAP_WIDTH, height,
                  x_range=Range1d(-0.5, steps - 0.5, bounds=(-0.5, steps - 0.5)),
                  y_range=Range1d(-0.5, filters - 0.5, bounds=(-0.5, filters - 0.5)),
                  x_label="time step", y_label="filter")
    plot.grid.visible = False
    image = plot.image(image=[maps.astype(np.float32)], x=-0.5, y=-0.5, dw=steps, dh=filters,
                       palette="Greys256", level="image")
    image.glyph.color_mapper.low, image.glyph.color_mapper.high = 0, 255
    plot.add_tools(HoverTool(renderers=[image], tooltips="filter $y{0}, step $x{0}: @image"))
    return plot


def input_figure(values, name, feature_names=None):
    """The visualization input ``name`` as the model saw it: curves (sequence) or bars (tabular)."""
    title = "Input: %s" % name
    if input_kind_of(values) == "tabular":
        return bars_figure(values, title, feature_names)
    return curves_figure(values, title)


def result_figure(values, title, y_label="value", feature_names=None):
    """A float result shaped like the input: curves per channel for (T, C), bars for (F,)."""
    if np.ndim(values) == 1:
        return bars_figure(values, title, feature_names, y_label=y_label)
    return curves_figure(values, title, y_label=y_label)
