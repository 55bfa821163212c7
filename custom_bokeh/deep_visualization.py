"""Deep visualization dashboard: the synthesized input of every chosen unit.

Each image is titled with its layer and unit and the unit's final activation;
all share pan and zoom, and the grid's save tool downloads all of them as one PNG.
A sequence model's synthetic input (T, C) is drawn as curves per channel, a
tabular model's (F,) as bars per feature, one chart per unit in a column. The
inputs grow from noise, so the dashboard has no input choice.
"""
from bokeh.layouts import column

from custom_bokeh import charts, images
from custom_keras import registry

TECHNIQUE = registry.get("deep_visualization")


def render(result, info, input_image, image_name):
    """The layout of one deep visualization snapshot.

    Args:
        result: [(uint8 (H, W, C) image, layer name, unit index, final activation), ...]
            (Appendix D.5); the unit index is an int or a (row, col, channel) tuple;
            a sequence or tabular model's inputs are float (T, C) or (F,).
        info: unused; this technique records no per-image info.
        input_image: unused; the images grow from noise, not from an input image.
        image_name: unused, for the same reason.
    """
    if not isinstance(result, (list, tuple)) or not result:
        raise ValueError("deep visualization results must be a non-empty list of "
                         "(image, layer name, unit index, activation) tuples, got %r" % (result,))
    for position, entry in enumerate(result):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 4):
            raise ValueError("deep visualization entry %d must be an (image, layer name, unit "
                             "index, activation) tuple, got %r" % (position, entry))
    if charts.input_kind_of(result[0][0]):
        return column(*[charts.result_figure(
            values, "%s \u00b7 activation %s" % (unit_title(layer_name, unit_index),
                                                format_activation(activation)),
            y_label="synthetic input") for values, layer_name, unit_index, activation in result],
            spacing=12)
    shown = [(image, unit_title(layer_name, unit_index),
              "activation %s" % format_activation(activation))
             for image, layer_name, unit_index, activation in result]
    # one frame width for all: room for the longest title, and equal images share pan and zoom
    width = max(images.title_room(title, subtitle) for _, title, subtitle in shown)
    return images.image_grid([images.image_figure(image, title, subtitle=subtitle,
                                                  min_frame_width=width)
                              for image, title, subtitle in shown], filename=TECHNIQUE.key)


def unit_title(layer_name, unit_index):
    """E.g. "dense_2 unit 7" or "conv2d_1 unit (12, 12, 0)"."""
    if isinstance(unit_index, (list, tuple)):
        unit_index = "(%s)" % ", ".join(str(int(i)) for i in unit_index)
    return "%s unit %s" % (layer_name, unit_index)


def format_activation(value):
    """One decimal for ordinary values (12.3, 11761.5), three significant digits for tiny ones."""
    value = float(value)
    return "%.1f" % value if value == 0 or abs(value) >= 0.1 else "%.3g" % value
