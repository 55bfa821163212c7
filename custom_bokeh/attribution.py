"""Attribution dashboard: one method's map overlaid on its input, with a colour map and opacity.

The map is drawn with a colour map over the input image (a sequential map for
unsigned maps, a diverging one centred at 128 for signed maps), with its colour
bar, the input alone beside it (pan and zoom linked) and an opacity slider that
changes the overlay in the browser (``CustomJS``, no round trip). The heading
names the class the map explains, whether predicted or chosen, and its
probability. A sequence or tabular input gets its attribution values as curves
or bars instead. Results are written by user code: anything malformed raises
``ValueError`` with what is wrong, which the dashboards show on the page.

The result of one image (stored per image by the attribution callbacks)::

    {"map": uint8 (H, W) or (H, W, 3),   # or "values": float like a sequence/tabular input
     "signed": bool,                      # signed: 128 = 0, 255 = +max|v|, 0 = -max|v|;
                                          # unsigned: 0..255 = min..max
     "method": "<technique key>",
     "feature_names": [str],              # optional, with "values" of a tabular input
     "guided_grad_cam": uint8 (H, W, 3) or (H, W, 1)}   # guided_backprop only

and its info ``{"class_index", "class_source": "predicted" | "fixed" | "label",
"probability", "predicted_class", "class_names" (optional)}``.
This module imports no keras.
"""
import math
import numbers

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import (ColorBar, CustomJS, Div, FixedTicker, LinearColorMapper, Slider)
from bokeh.palettes import Inferno256, RdBu11, interp_palette

from custom_bokeh import charts, images
from custom_keras import registry

# Unsigned maps: dark = little, bright = much. Signed maps: blue < 0 < red, transparent at 0
# and opaque from half the largest |v| on, so the input shows where nothing counts.
UNSIGNED_PALETTE = Inferno256
SIGNED_PALETTE = tuple("%s%02x" % (color, min(255, round(255 * abs(value - 128) / 64)))
                       for value, color in enumerate(interp_palette(RdBu11, 257)[:256]))
GROUND_BRIGHTNESS = 0.6      # the input under a map is dimmed, so that pale colours show on it
DEFAULT_OPACITY = 0.6
MAIN_IMAGE_PIXELS = 320      # screen size of the longer side in the one-method view
PANEL_IMAGE_PIXELS = 168     # in the side-by-side view
COLOR_BAR_WIDTH = 12
CLASS_SOURCES = {"predicted": "predicted", "fixed": "chosen", "label": "the true label"}
HEADING_STYLES = {"font-size": "15px", "font-weight": "600", "white-space": "pre-wrap"}
# Moves every overlay glyph in ``overlays`` to the slider's value, in the browser.
OPACITY_CODE = "for (const overlay of overlays) { overlay.global_alpha = cb_obj.value }"


def method_title(key):
    """The technique's title from the registry, else the key in words."""
    technique = registry.get(key) if isinstance(key, str) else None
    return technique.title if technique else str(key).replace("_", " ").capitalize()[:60]


def check_result(result, input_image):
    """Raises ``ValueError`` saying what is wrong with an attribution result, else returns it.

    Args:
        result: one image's result (format in the module docstring).
        input_image: the input as fed to the model (uint8 image or float array), or None.
    """
    if not isinstance(result, dict):
        raise ValueError('an attribution result must be a dict with "map" (or "values"), '
                         '"signed" and "method", got %s' % type(result).__name__)
    missing = [key for key in ("signed", "method") if key not in result]
    if "map" not in result and "values" not in result:
        missing.insert(0, '"map" (or "values")')
    if missing:
        raise ValueError("the attribution result lacks %s" % ", ".join(missing))
    if not isinstance(result["signed"], (bool, np.bool_)):
        raise ValueError('"signed" must be True or False, got %r' % (result["signed"],))
    if "values" in result:
        values = np.asarray(result["values"])
        if values.dtype.kind != "f" or values.ndim not in (1, 2) or values.size == 0:
            raise ValueError('"values" must be a float array shaped (F,) or (T, C), got %s of '
                             "shape %s" % (values.dtype, values.shape))
        if input_image is not None and np.shape(input_image) != values.shape:
            raise ValueError('"values" has shape %s but the input has shape %s'
                             % (values.shape, np.shape(input_image)))
        return result
    check_image(result["map"], '"map"', channels=(1, 3))
    _check_same_size(result["map"], '"map"', input_image)
    if "guided_grad_cam" in result:
        check_image(result["guided_grad_cam"], '"guided_grad_cam"', channels=(1, 3))
        _check_same_size(result["guided_grad_cam"], '"guided_grad_cam"', input_image)
    return result


def check_image(array, argument, channels):
    """Raises ``ValueError`` unless ``array`` is a non-empty uint8 (H, W) or (H, W, c in channels)."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise ValueError("%s must be a uint8 array (0..255), got %s" % (
            argument, array.dtype if isinstance(array, np.ndarray) else type(array).__name__))
    if not (array.ndim == 2 or array.ndim == 3 and array.shape[2] in channels) or 0 in array.shape:
        raise ValueError("%s must have shape (H, W) or (H, W, %s), got %s" % (
            argument, " or ".join(map(str, channels)), array.shape))


def _check_same_size(array, argument, input_image):
    if input_image is None:
        return
    if not (isinstance(input_image, np.ndarray) and input_image.dtype == np.uint8
            and input_image.ndim in (2, 3)):
        raise ValueError("%s is an image map but the input is not an image (%s of shape %s)"
                         % (argument, getattr(input_image, "dtype", type(input_image).__name__),
                            np.shape(input_image)))
    if array.shape[:2] != input_image.shape[:2]:
        raise ValueError("%s is %d \u00d7 %d pixels but the input image is %d \u00d7 %d" % (
            argument, array.shape[0], array.shape[1], input_image.shape[0], input_image.shape[1]))


def _class_name(index, names):
    text = "class %s" % index
    if isinstance(names, (list, tuple)) and 0 <= index < len(names) and isinstance(names[index], str):
        text += ' "%s"' % names[index][:40]
    return text


def explains_text(info):
    """E.g. "Explains class 7 (predicted), probability 93.2 %", or for a chosen class with
    class names 'Explains class 3 "cat" (chosen), probability 0.4 %; the model predicts
    class 7 "dog"'."""
    index, source = info.get("class_index"), info.get("class_source")
    if not isinstance(index, numbers.Integral) or isinstance(index, bool):
        return "The class this map explains is not recorded."
    names = info.get("class_names")
    text = "Explains %s (%s)" % (_class_name(index, names), CLASS_SOURCES.get(source, "chosen"))
    probability = info.get("probability")
    if isinstance(probability, numbers.Real) and math.isfinite(probability):
        # a chosen class often has a tiny probability: "0.0 %" would hide that it is not zero
        text += (", probability below 0.1 %" if 0 < probability < 0.0005 else
                 ", probability %.1f %%" % (100.0 * float(probability)))
    predicted = info.get("predicted_class")
    if (source != "predicted" and isinstance(predicted, numbers.Integral)
            and not isinstance(predicted, bool)):
        text += ("; the model predicts it too" if predicted == index else
                 "; the model predicts %s" % _class_name(predicted, names))
    return text


def as_drawable(image):
    """An input image as the image figures draw it: an RGBA input without its alpha."""
    return image[:, :, :3] if image.ndim == 3 and image.shape[2] == 4 else image


def overlay_map(attribution_map, signed):
    """The one-channel map drawn over the input: a (H, W, 3) map keeps, per pixel, its
    strongest channel (the farthest from 128 when signed, the largest when not)."""
    if attribution_map.ndim == 2:
        return attribution_map
    if not signed:
        return attribution_map.max(axis=2)
    strongest = np.abs(attribution_map.astype(np.int16) - 128).argmax(axis=2)
    return np.take_along_axis(attribution_map, strongest[:, :, None], axis=2)[:, :, 0]


def color_mapper(signed):
    """Maps each uint8 value to its own colour (low and high are the values' outer edges)."""
    return LinearColorMapper(palette=SIGNED_PALETTE if signed else UNSIGNED_PALETTE,
                             low=-0.5, high=255.5)


def color_bar(mapper, signed):
    labels = ({0: "\u2212max|v|", 128: "0", 255: "+max|v|"} if signed else
              {0: "min", 255: "max"})
    return ColorBar(color_mapper=mapper, ticker=FixedTicker(ticks=list(labels)),
                    major_label_overrides={tick: label for tick, label in labels.items()},
                    width=COLOR_BAR_WIDTH, padding=4, major_tick_line_color=None,
                    major_label_text_font_size="11px", title_text_font_size="11px")


def overlay_figure(attribution_map, signed, input_image, title, pixels, min_frame_width=0):
    """The map in colour over the input image, with its colour bar: (figure, overlay renderer).

    Args:
        attribution_map: uint8 (H, W), (H, W, 1) or (H, W, 3), checked by ``check_result``.
        signed: whether 128 is zero (a diverging colour map) or 0 is the least (sequential).
        input_image: uint8 (H, W, C) of the same height and width, or None (a white ground).
        title: the figure title.
        pixels: screen size of the longer side.
        min_frame_width: see ``images.image_figure``.
    """
    values = overlay_map(attribution_map, signed)
    ground = (np.full(values.shape, 255, np.uint8) if input_image is None else
              (as_drawable(input_image) * GROUND_BRIGHTNESS).astype(np.uint8))
    height, width = values.shape
    plot = images.image_figure(ground, title, images.display_scale(height, width, pixels),
                               min_frame_width=min_frame_width)
    mapper = color_mapper(signed)
    overlay = plot.image(image=[values[::-1].astype(np.float32)], x=0, y=0, dw=width, dh=height,
                         color_mapper=mapper, global_alpha=DEFAULT_OPACITY)
    plot.add_layout(color_bar(mapper, signed), "right")
    return plot, overlay


def opacity_slider(overlays, value=DEFAULT_OPACITY):
    """A slider that sets the opacity of the ``overlays`` renderers' glyphs in the browser."""
    slider = Slider(start=0, end=1, step=0.05, value=value, title="Map opacity", width=260)
    slider.js_on_change("value", CustomJS(args={"overlays": [o.glyph for o in overlays]},
                                          code=OPACITY_CODE))
    return slider


def render(result, info, input_image, image_name):
    """The layout of one attribution snapshot of one image.

    Args:
        result: the image's attribution result (format in the module docstring).
        info: {"class_index", "class_source", "probability", "predicted_class",
            "class_names" (optional)}, or {}.
        input_image: uint8 (H, W, C) image as fed to the model, else the float input
            of a sequence or tabular model, or None.
        image_name: the visualization input's name.
    """
    check_result(result, input_image)
    title = method_title(result["method"])
    heading = Div(text=explains_text(info if isinstance(info, dict) else {}),
                  render_as_text=True, styles=HEADING_STYLES)
    if "values" in result:
        names = result.get("feature_names")
        figures = [charts.input_figure(input_image, image_name, names)] \
            if charts.input_kind_of(input_image) else []
        figures.append(charts.result_figure(result["values"], "%s: attribution" % title,
                                            y_label="attribution", feature_names=names))
        return column(heading, *figures, spacing=12)
    signed = bool(result["signed"])
    shown = [("%s, %s" % (title, "signed" if signed else "unsigned"), result["map"])]
    if input_image is not None:
        shown.append(("Input: %s" % image_name, as_drawable(input_image)))
    if result["map"].ndim == 3 and result["map"].shape[2] == 3:
        shown.append(("%s per colour channel" % title, result["map"]))
    if "guided_grad_cam" in result:
        shown.append(("Guided Grad-CAM", result["guided_grad_cam"]))
    # one frame width for all, so that the linked images line up
    frame = max(images.title_room(name) for name, _ in shown)
    plot, overlay = overlay_figure(result["map"], signed, input_image, shown[0][0],
                                   MAIN_IMAGE_PIXELS, frame)
    height, width = result["map"].shape[:2]
    figures = [plot]
    for name, image in shown[1:]:
        figure = images.image_figure(image, name, images.display_scale(
            height, width, MAIN_IMAGE_PIXELS), min_frame_width=frame)
        figure.x_range, figure.y_range = plot.x_range, plot.y_range
        figures.append(figure)
    return column(heading, opacity_slider([overlay]), row(*figures, spacing=8))
