"""Saliency map dashboard: the input beside its saliency.

An image beside its map, pan and zoom linked between them; a sequence as curves
over time per channel of the input, the gradient and gradient x input; a tabular
row as bars per feature of the gradient and gradient x input.
"""
import numpy as np
from bokeh.layouts import column, row
from bokeh.models import Div

from custom_bokeh import charts
from custom_bokeh.images import image_figure


def render(result, info, input_image, image_name):
    """The layout of one saliency snapshot.

    Args:
        result: uint8 (H, W, 1) saliency map (Appendix D), or for a sequence or
            tabular input {"gradient", "gradient_x_input", "input": float arrays
            shaped like the input, "feature_names": [str] (optional)}.
        info: {"predicted_class": int, "confidence": float}, {"score": float} or {}.
        input_image: uint8 (H, W, C) image as fed to the model, or None.
        image_name: the visualization input's name.
    """
    heading = Div(text=prediction_text(info), render_as_text=True,
                  styles={"font-size": "15px", "font-weight": "600"})
    if isinstance(result, dict):
        return column(heading, *attribution_figures(result, image_name))
    saliency = image_figure(result, "Saliency map")
    figures = [saliency]
    if input_image is not None:
        original = image_figure(input_image, "Input: %s" % image_name)
        # one shared pair of ranges: panning or zooming either image moves both
        saliency.x_range, saliency.y_range = original.x_range, original.y_range
        figures.insert(0, original)
    return column(heading, row(*figures))


def attribution_figures(result, input_name):
    """The input, the gradient and gradient x input of a sequence or tabular input."""
    missing = [key for key in ("gradient", "gradient_x_input", "input") if key not in result]
    if missing:
        raise ValueError("a saliency result of a sequence or tabular input needs %s"
                         % ", ".join(missing))
    names = result.get("feature_names")
    if np.ndim(result["gradient"]) == 1:
        return [charts.bars_figure(result["input"], "Input: %s" % input_name, names),
                charts.bars_figure(result["gradient"], "Gradient of the score per feature",
                                   names, y_label="gradient"),
                charts.bars_figure(result["gradient_x_input"],
                                   "Gradient \u00d7 input per feature", names,
                                   y_label="gradient \u00d7 input")]
    return [charts.curves_figure(result["input"], "Input: %s" % input_name),
            charts.curves_figure(result["gradient"], "Gradient of the score over time",
                                 y_label="gradient"),
            charts.curves_figure(result["gradient_x_input"], "Gradient \u00d7 input over time",
                                 y_label="gradient \u00d7 input")]


def prediction_text(info):
    """E.g. "Predicted class 7 with confidence 93.2 %", or "Output score 0.734"."""
    if "predicted_class" not in info and "score" in info:
        return "Output score %.4g" % float(info["score"])
    if "predicted_class" not in info:
        return "No prediction recorded for this snapshot."
    text = "Predicted class %s" % info["predicted_class"]
    if info.get("confidence") is not None:
        text += " with confidence %.1f %%" % (100.0 * float(info["confidence"]))
    return text
