"""The one list of visualization techniques that the pages and the Bokeh server read.

Adding a technique means: a module in ``custom_keras/techniques/``, a callback in
``custom_keras/callbacks.py``, a Bokeh app ``custom_bokeh/<key>.py`` with a
``make_document(doc)`` function, and one entry here. Nothing else lists them.
This module imports no keras, so the servers can use it.
"""
from dataclasses import dataclass

from custom_keras import storage


@dataclass(frozen=True)
class Technique:
    """One visualization technique.

    Args:
        key: URL slug, Bokeh app path and module name in ``custom_bokeh``.
        title: the tab title.
        results_file: the latest-snapshot file in ``results/`` (Appendix D name).
        register_call: the line a script needs to produce this technique.
        description: two or three sentences on what it shows and how to read it.
    """
    key: str
    title: str
    results_file: str
    register_call: str
    description: str


TECHNIQUES = (
    Technique(
        key="training_progress",
        title="Training progress",
        results_file=storage.TRAINING_PROGRESS_FILE,
        register_call="callbacks.register_training_progress()",
        description=(
            "Loss and every metric for each batch, against training progress in epochs; "
            "validation values per epoch as green circles. A curve that improves quickly and "
            "then stalls suggests a learning rate that is too high; validation accuracy falling "
            "while training accuracy still rises is the mark of overfitting."),
    ),
    Technique(
        key="gradients",
        title="Gradients",
        results_file=storage.GRADIENT_NORMS_TABLE,
        register_call="callbacks.register_health_checks()",
        description=(
            "The gradient norm of every layer over training (log scale), and the fraction of "
            "dead units of every ReLU layer, measured by the health checks. Norms that shrink "
            "layer by layer towards the input mean vanishing gradients; norms that grow by "
            "orders of magnitude mean exploding ones; a layer whose units go dead stops learning."),
    ),
    Technique(
        key="layer_activations",
        title="Layer activations",
        results_file="layer_activations.pickle",
        register_call="callbacks.register_layer_activations()",
        description=(
            "The output of every layer for the visualization image: one grey map per filter for "
            "convolutional layers, one pixel per unit for dense layers; brighter means a higher "
            "activation. Sparse, localized activations are a good sign; filters that stay black "
            "for every image are dead, which often means the learning rate is too high."),
    ),
    Technique(
        key="saliency_maps",
        title="Saliency maps",
        results_file="saliency_maps.pickle",
        register_call="callbacks.register_saliency_maps()",
        description=(
            "How strongly each input pixel moves the score of the predicted class (the absolute "
            "gradient of the pre-softmax score). Bright pixels decided the prediction; a network "
            "that has learned well lights up the object, not the background."),
    ),
    Technique(
        key="deconvolutional_network",
        title="Deconvolutional network",
        results_file="deconvolutional_network.pickle",
        register_call="callbacks.register_deconvolutional_network(3, feat_map_amount=8)",
        description=(
            "For the most active feature maps of one layer, the pattern in the input image that "
            "caused each map's strongest activation (Zeiler & Fergus), mapped back to pixels. "
            "Early layers should pick out edges and strokes; reconstructions that stay noisy "
            "suggest filters that have not converged yet."),
    ),
    Technique(
        key="deep_visualization",
        title="Deep visualization",
        results_file="deep_visualization.pickle",
        register_call=("callbacks.register_deep_visualization([(9, 0), (9, 1)], learning_rate=200, "
                       "no_of_iterations=50, l2_decay=0.0001, blur_interval=4, blur_std=1.0)"),
        description=(
            "A synthetic image that a chosen unit responds to strongly, grown from noise by "
            "regularised gradient ascent (Yosinski et al.). For an output unit it shows what the "
            "network thinks the class looks like; the number is the unit's final activation."),
    ),
)

# The techniques with a history of pickled snapshots (image dashboards with a slider); the
# others draw tables of numbers.
SNAPSHOT_TECHNIQUES = tuple(t for t in TECHNIQUES if t.results_file.endswith(".pickle"))

_BY_KEY = {t.key: t for t in TECHNIQUES}


def get(key):
    """The technique with this key, or None."""
    return _BY_KEY.get(key)
