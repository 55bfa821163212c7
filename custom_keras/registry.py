"""The one list of visualization techniques: each technique is declared here once.

A declaration says what the technique is called and how to read it, what it needs,
its pure function and which arguments the script passes it, and where its callback
(keras side) and its drawing (Bokeh side) live, as dotted paths ``"module:name"``
imported only when used (``load``), so this module imports neither keras nor bokeh
and both servers read it. From the declaration come:

- ``CustomCallbacks.register_<key>(<parameters>, interval=None)``, with the
  parameters' defaults from the pure function's signature (``custom_keras.callbacks``);
- the results file ``results/<key>.pickle`` and its history;
- the Bokeh app ``/<key>``: ``image_dashboard`` with the declared ``render``, or the
  declared ``make_document`` for a page of its own (``custom_bokeh.__main__``);
- the file page's tab, its title and explanation (``visualizer``).

Adding a technique is one module (its pure function) and one entry in
``TECHNIQUES``; see README, "Adding a technique".
"""
import importlib
from dataclasses import dataclass, field

from custom_keras import storage

# What a technique can need from the model and the inputs; a run that lacks one
# switches the technique off with the reason. Without IMAGE_INPUT it draws sequences
# (T, C) and feature vectors (F,) too.
IMAGE_INPUT = "image input"          # an input (H, W, C)
SPATIAL_LAYER = "spatial layer"      # a layer with an output (N, h, w, channels)
CLASS_SCORES = "class scores"        # one output of scores (N, classes)

# How a map of numbers is scaled for display (the callbacks store uint8 maps of images).
UNSIGNED = "unsigned"   # 0..max -> 0..255, one (H, W) map
SIGNED = "signed"       # summed over channels, -max|v|..0..+max|v| -> 0..128..255
IMAGE_LIKE = "image"    # per channel, min..max -> 0..255, like a deconvolution

ATTRIBUTION = "attribution"
ATTRIBUTION_CALLBACK = "custom_keras.callbacks:AttributionMaps"
ATTRIBUTION_RENDER = "custom_bokeh.attribution:render"


@dataclass(frozen=True)
class Explanation:
    """A technique in plain language, in three parts that pages may show apart.

    Args:
        shows: what the technique shows.
        reading: how to read it.
        misleads: one way it misleads.
    """
    shows: str
    reading: str
    misleads: str

    def __str__(self):
        return " ".join((self.shows, self.reading, self.misleads))


@dataclass(frozen=True)
class Technique:
    """One visualization technique.

    Args:
        key: URL slug, Bokeh app path, ``register_<key>`` and results file stem.
        title: the tab title.
        explanation: an ``Explanation``.
        register_call: an example of the line a script needs for this technique.
        results_file: the latest-snapshot file in ``results/``; ``<key>.pickle`` by
            default for a technique with a callback (the first five keep their
            Appendix D names).
        function: ``"module:function"``, the pure function
            ``function(model, inputs, **parameters, labels=None)`` -> one float32
            array per input.
        parameters: the names of ``function``'s arguments that ``register_<key>``
            takes (with the function's defaults), before ``interval``.
        companions: ``(("name", "module:function"), ...)``: more pure functions
            computed with the same arguments (those they take), stored beside the
            main result under their name.
        display: how its maps are scaled for display: ``UNSIGNED``, ``SIGNED`` or
            ``IMAGE_LIKE``.
        callback: ``"module:Class"``, the callback that computes the snapshots. A
            class for a declared ``function`` takes ``(file_folder, technique,
            interval, params, **settings)`` (``AttributionMaps`` does: one class
            serves every attribution method); ``CustomCallbacks`` then builds
            ``register_<key>`` from the declaration.
        needs: what it needs of the model and the inputs (``IMAGE_INPUT``,
            ``SPATIAL_LAYER``, ``CLASS_SCORES``).
        render: ``"module:function"``, ``render(result, info, input_image,
            image_name)`` -> a Bokeh layout of one snapshot, drawn live by
            ``custom_bokeh.dashboard.image_dashboard``.
        make_document: ``"module:function"``, ``make_document(doc)`` for a page
            of its own instead of ``render``.
        one_result_for_every_input: the result does not depend on the input (no
            input choice on the page).
        family: the group it belongs to (``ATTRIBUTION``), or None.
        tab_when_registered: keys of techniques: the tab is shown only when the
            run registered one of them (empty: always shown).
    """
    key: str
    title: str
    explanation: Explanation
    register_call: str
    results_file: str = None
    function: str = None
    parameters: tuple = ()
    companions: tuple = ()
    display: str = None
    callback: str = None
    needs: frozenset = frozenset()
    render: str = None
    make_document: str = None
    one_result_for_every_input: bool = False
    family: str = None
    tab_when_registered: tuple = field(default=())

    def __post_init__(self):
        if self.results_file is None and self.callback is not None:
            object.__setattr__(self, "results_file", self.key + ".pickle")
        if (self.render is None) == (self.make_document is None):
            raise ValueError("technique %s: declare either render or make_document" % self.key)

    @property
    def description(self):
        """The explanation as one paragraph."""
        return str(self.explanation)

    def shows_tab(self, registered_keys):
        """Whether the file page shows this technique's tab, given the run's registered keys
        (None: the run registered nothing yet)."""
        return not self.tab_when_registered or bool(
            set(self.tab_when_registered) & set(registered_keys or ()))


def load(dotted_path):
    """The object a ``"module:name"`` path names, importing its module now."""
    module, _, name = dotted_path.partition(":")
    return getattr(importlib.import_module(module), name)


def _attribution(key, title, explanation, parameters, display, needs=(IMAGE_INPUT,),
                 companions=()):
    """An attribution method: its pure function ``custom_keras.techniques.attribution.<key>``,
    drawn by the attribution dashboard, computed by ``AttributionMaps``."""
    return Technique(key=key, title=title, explanation=explanation,
                     register_call="callbacks.register_%s()" % key,
                     function="custom_keras.techniques.attribution:" + key,
                     parameters=tuple(parameters), companions=tuple(companions), display=display,
                     callback=ATTRIBUTION_CALLBACK, needs=frozenset(needs) | {CLASS_SCORES},
                     render=ATTRIBUTION_RENDER, family=ATTRIBUTION,
                     # fifteen tabs would bury the ones a run has: each shows once registered
                     tab_when_registered=(key,))


_CAM_READING = ("Warm regions raised the explained class's score; the map is coarse, at the "
                "resolution of the chosen layer, stretched to the image.")

TECHNIQUES = (
    Technique(
        key="training_progress",
        title="Training progress",
        explanation=Explanation(
            shows="Loss and every metric for each batch, against training progress in epochs; "
                  "validation values per epoch as green circles.",
            reading="A curve that improves quickly and then stalls suggests a learning rate "
                    "that is too high; validation accuracy falling while training accuracy "
                    "still rises is the mark of overfitting.",
            misleads="A single batch's values are noisy: judge the trend, not one point."),
        results_file=storage.TRAINING_PROGRESS_FILE,
        register_call="callbacks.register_training_progress()",
        make_document="custom_bokeh.training_progress:make_document",
    ),
    Technique(
        key="gradients",
        title="Gradients",
        explanation=Explanation(
            shows="The gradient norm of every layer over training (log scale), and the fraction "
                  "of dead units of every ReLU layer, measured by the health checks.",
            reading="Norms that shrink layer by layer towards the input mean vanishing "
                    "gradients; norms that grow by orders of magnitude mean exploding ones; a "
                    "layer whose units go dead stops learning.",
            misleads="The norms are measured on a few samples of one batch every interval, so a "
                     "single spike may be that batch's."),
        results_file=storage.GRADIENT_NORMS_TABLE,
        register_call="callbacks.register_health_checks()",
        make_document="custom_bokeh.gradients:make_document",
    ),
    Technique(
        key="layer_activations",
        title="Layer activations",
        explanation=Explanation(
            shows="The output of every layer for the visualization image: one grey map per "
                  "filter for convolutional layers, one pixel per unit for dense layers.",
            reading="Brighter means a higher activation. Sparse, localized activations are a "
                    "good sign; filters that stay black for every image are dead, which often "
                    "means the learning rate is too high.",
            misleads="Each layer is scaled to its own maximum, so a faint layer and a strong one "
                     "look alike."),
        results_file="layer_activations.pickle",
        register_call="callbacks.register_layer_activations()",
        callback="custom_keras.callbacks:LayerActivations",
        render="custom_bokeh.layer_activations:render",
    ),
    Technique(
        key="saliency_maps",
        title="Saliency maps",
        explanation=Explanation(
            shows="How strongly each input pixel moves the score of the predicted class (the "
                  "absolute gradient of the pre-softmax score).",
            reading="Bright pixels decided the prediction; a network that has learned well "
                    "lights up the object, not the background.",
            misleads="A gradient is local: it says what a tiny change would do, and looks noisy "
                     "even for a good network."),
        results_file="saliency_maps.pickle",
        register_call="callbacks.register_saliency_maps()",
        callback="custom_keras.callbacks:SaliencyMaps",
        render="custom_bokeh.saliency_maps:render",
    ),
    Technique(
        key="deconvolutional_network",
        title="Deconvolutional network",
        explanation=Explanation(
            shows="For the most active feature maps of one layer, the pattern in the input image "
                  "that caused each map's strongest activation (Zeiler & Fergus), mapped back to "
                  "pixels.",
            reading="Early layers should pick out edges and strokes; reconstructions that stay "
                    "noisy suggest filters that have not converged yet.",
            misleads="The backward pass ignores the input below the strongest activation's "
                     "ReLUs, so the pattern looks cleaner than what the filter really responds "
                     "to."),
        results_file="deconvolutional_network.pickle",
        register_call="callbacks.register_deconvolutional_network(3, feat_map_amount=8)",
        callback="custom_keras.callbacks:DeconvolutionalNetwork",
        render="custom_bokeh.deconvolutional_network:render",
    ),
    Technique(
        key="deep_visualization",
        title="Deep visualization",
        explanation=Explanation(
            shows="A synthetic image that a chosen unit responds to strongly, grown from noise "
                  "by regularised gradient ascent (Yosinski et al.).",
            reading="For an output unit it shows what the network thinks the class looks like; "
                    "the number is the unit's final activation.",
            misleads="The regularisers decide much of how natural the image looks: a noisy "
                     "image may be the settings' fault, not the network's."),
        results_file="deep_visualization.pickle",
        register_call=("callbacks.register_deep_visualization([(9, 0), (9, 1)], learning_rate=200, "
                       "no_of_iterations=50, l2_decay=0.0001, blur_interval=4, blur_std=1.0)"),
        callback="custom_keras.callbacks:DeepVisualization",
        render="custom_bokeh.deep_visualization:render",
        one_result_for_every_input=True,
    ),
    _attribution(
        "grad_cam", "Grad-CAM",
        Explanation(
            shows="Where in the image the explained class's evidence lies: the feature maps of "
                  "the last spatial layer weighted by the mean gradient of the class score "
                  "(Selvaraju et al.).",
            reading=_CAM_READING,
            misleads="It only sees the chosen layer: evidence that earlier layers found and "
                     "later ones pooled away does not show."),
        ("layer_no", "class_index"), UNSIGNED, needs=(IMAGE_INPUT, SPATIAL_LAYER)),
    _attribution(
        "grad_cam_plus_plus", "Grad-CAM++",
        Explanation(
            shows="Grad-CAM with each feature map weighted by its positive gradients, pixel by "
                  "pixel (Chattopadhyay et al.), which covers several instances of a class "
                  "better.",
            reading=_CAM_READING,
            misleads="Like Grad-CAM it is coarse and sees one layer; its weights can make weak "
                     "regions look as important as strong ones."),
        ("layer_no", "class_index"), UNSIGNED, needs=(IMAGE_INPUT, SPATIAL_LAYER)),
    _attribution(
        "score_cam", "Score-CAM",
        Explanation(
            shows="The feature maps of the last spatial layer weighted by how probable the class "
                  "stays when the image is masked by each map (Wang et al.): no gradients.",
            reading=_CAM_READING,
            misleads="It costs one forward pass per feature map, and a map that masks most of "
                     "the image can score high for any class."),
        ("layer_no", "class_index", "max_maps"), UNSIGNED, needs=(IMAGE_INPUT, SPATIAL_LAYER)),
    _attribution(
        "guided_backprop", "Guided backpropagation",
        Explanation(
            shows="The gradient of the class score with only positive gradients let through "
                  "every ReLU (Springenberg et al.), and beside it guided Grad-CAM: the same "
                  "multiplied by the Grad-CAM map.",
            reading="Sharp strokes and edges are the input details the class score follows; "
                    "guided Grad-CAM keeps those in the class's region.",
            misleads="Guided backpropagation looks almost the same for every class and even for "
                     "a network with random weights: it shows edges of the image more than the "
                     "network's reasons (Adebayo et al.)."),
        ("class_index",), IMAGE_LIKE,
        companions=(("guided_grad_cam", "custom_keras.techniques.attribution:guided_grad_cam"),)),
    _attribution(
        "smooth_grad", "SmoothGrad",
        Explanation(
            shows="The gradient of the class score averaged over noisy copies of the input "
                  "(Smilkov et al.), signed.",
            reading="Red raised the score, blue lowered it; the averaging removes the speckle "
                    "of a plain gradient.",
            misleads="Like every gradient it is local: a pixel that matters but already "
                     "saturates the network gets little."),
        ("samples", "noise", "class_index"), SIGNED, needs=()),
    _attribution(
        "integrated_gradients", "Integrated Gradients",
        Explanation(
            shows="Each input value's share of the class score's change from a baseline (black) "
                  "to the input, the gradient integrated along the straight path (Sundararajan "
                  "et al.).",
            reading="Red raised the score, blue lowered it; the shares add up to score(input) - "
                    "score(baseline).",
            misleads="Everything is relative to the baseline: with a black baseline, black "
                     "pixels get no share whatever their role."),
        ("steps", "baseline", "class_index"), SIGNED, needs=()),
    _attribution(
        "occlusion", "Occlusion",
        Explanation(
            shows="How much the class score falls when a square patch of the image is covered, "
                  "summed over the patches covering each pixel (Zeiler & Fergus).",
            reading="Red: covering it lowers the score (the region supports the class); blue: "
                    "covering it raises the score.",
            misleads="The covering value is itself a pattern: a black patch on a black "
                     "background changes nothing, and features smaller or larger than the patch "
                     "are missed."),
        ("patch", "stride", "value", "class_index"), SIGNED),
    _attribution(
        "lrp", "LRP",
        Explanation(
            shows="The class score redistributed backwards layer by layer onto the input values "
                  "(layer-wise relevance propagation, Bach et al.) with the chosen rule.",
            reading="Red values carry relevance for the class, blue against it; with the epsilon "
                    "rule and no biases the relevances add up to the score.",
            misleads="The map depends much on the rule: epsilon is faithful but noisy, z_plus "
                     "and alpha_beta look clean but show positive evidence only."),
        ("rule", "epsilon", "alpha", "beta", "first_layer_rule", "class_index"), SIGNED,
        needs=()),
)

ATTRIBUTION_TECHNIQUES = tuple(t for t in TECHNIQUES if t.family == ATTRIBUTION)

TECHNIQUES += (
    Technique(
        key="attribution_methods",
        title="Attribution methods",
        explanation=Explanation(
            shows="Every attribution method of the run side by side, for one image at one stage "
                  "of training.",
            reading="Where the methods agree, the evidence is solid; where one method alone "
                    "lights a region, read that method's own tab before trusting it.",
            misleads="The maps are each scaled on their own, so equal colours in two maps do not "
                     "mean equal attributions."),
        register_call="callbacks.register_grad_cam()",
        make_document="custom_bokeh.attribution_methods:make_document",
        tab_when_registered=tuple(t.key for t in ATTRIBUTION_TECHNIQUES),
    ),
)

# The techniques with a history of pickled snapshots drawn by ``image_dashboard``.
SNAPSHOT_TECHNIQUES = tuple(t for t in TECHNIQUES if t.render is not None)

_BY_KEY = {t.key: t for t in TECHNIQUES}


def get(key):
    """The technique with this key, or None."""
    return _BY_KEY.get(key)
