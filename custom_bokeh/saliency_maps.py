"""Saliency map dashboard: the input image beside its map, pan and zoom linked between them."""
from bokeh.layouts import column, row
from bokeh.models import Div

from custom_bokeh.dashboard import image_dashboard
from custom_bokeh.images import image_figure
from custom_keras import registry

TECHNIQUE = registry.get("saliency_maps")


def render(result, info, input_image, image_name):
    """The layout of one saliency snapshot.

    Args:
        result: uint8 (H, W, 1) saliency map (Appendix D).
        info: {"predicted_class": int, "confidence": float}, or {}.
        input_image: uint8 (H, W, C) image as fed to the model, or None.
        image_name: the visualization image's file name.
    """
    saliency = image_figure(result, "Saliency map")
    figures = [saliency]
    if input_image is not None:
        original = image_figure(input_image, "Input: %s" % image_name)
        # one shared pair of ranges: panning or zooming either image moves both
        saliency.x_range, saliency.y_range = original.x_range, original.y_range
        figures.insert(0, original)
    return column(Div(text=prediction_text(info), render_as_text=True,
                      styles={"font-size": "15px", "font-weight": "600"}),
                  row(*figures))


def prediction_text(info):
    """E.g. "Predicted class 7 with confidence 93.2 %"."""
    if "predicted_class" not in info:
        return "No prediction recorded for this snapshot."
    text = "Predicted class %s" % info["predicted_class"]
    if info.get("confidence") is not None:
        text += " with confidence %.1f %%" % (100.0 * float(info["confidence"]))
    return text


def make_document(doc):
    """The saliency maps app of the Bokeh server."""
    image_dashboard(doc, TECHNIQUE, render)
