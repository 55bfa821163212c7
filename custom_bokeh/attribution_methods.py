"""PLACEHOLDER until the `attrdash` branch is merged, which brings the real module (all
attribution methods of a run side by side). It only lets the registry's
``attribution_methods`` entry be served and tested on the `protocol` branch."""
from custom_bokeh.dashboard import message_div, open_run
from custom_keras import registry


def make_document(doc):
    """The app's page: only a notice on this branch."""
    doc.title = registry.get("attribution_methods").title
    if open_run(doc) is not None:
        doc.add_root(message_div("The side-by-side view comes with the attrdash branch."))
