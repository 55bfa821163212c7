"""PLACEHOLDER until the `attrdash` branch is merged, which brings the real module (a map
overlaid on its image with a colour map and an opacity slider). It only lets the
registry's attribution entries be served and tested on the `protocol` branch."""
from bokeh.layouts import column
from bokeh.models import Div

from custom_bokeh import charts
from custom_bokeh.images import image_figure


def render(result, info, input_image, image_name):
    """One attribution snapshot: the stored map (or values) and the class it explains."""
    heading = Div(text="Class %s" % info.get("class_index"), render_as_text=True)
    if "values" in result:
        return column(heading, charts.result_figure(result["values"], result["method"]))
    return column(heading, image_figure(result["map"], result["method"]))
