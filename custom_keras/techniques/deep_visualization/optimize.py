"""The optimisation loop of deep visualization: gradient ascent, then regularise.

The whole loop, every iteration with its regularisers, is one TensorFlow
graph (``tf.while_loop``): a ``DeepVisualizationModel`` traces it once and then
runs all iterations in one call, without a round trip through Python or numpy
per step.
"""
import tensorflow as tf

from custom_keras.techniques.deep_visualization.objectives import UnitObjective
from custom_keras.techniques.deep_visualization.parameterization import random_noise_images
from custom_keras.techniques.deep_visualization.transforms import Regularizers, check_regularizers


# Lucid's render_vis redirects ReLU gradients for its first 16 steps: enough to
# switch on units that are off for their start image; afterwards the plain
# gradient refines them. On the trained reference network this takes the
# hidden units that end at activation 0 from 73 of 224 to none.
REDIRECTED_RELU_STEPS = 16


def ascent_graph(objective, images, learning_rate, no_of_iterations, regularizers,
                 redirected_relu_steps=REDIRECTED_RELU_STEPS):
    """The gradient-ascent loop as graph operations: call it inside a ``tf.function``.

    ``x += learning_rate * grad``, then ``regularizers(x, grad, iteration)``, for
    ``no_of_iterations`` steps; the first ``redirected_relu_steps`` use redirected
    ReLU gradients. ``tf.while_loop`` s keep the graph the same size whatever the
    number of iterations.

    Args:
        objective: a ``UnitObjective`` (or any object with ``value_and_gradients_graph``).
        images: float32 tensor of start images, one per unit of the objective.
        learning_rate: step size of the gradient ascent.
        no_of_iterations: number of steps (int).
        regularizers: a ``Regularizers`` (or any callable ``(images, gradients, iteration)``
            that accepts tensors and a scalar int32 tensor iteration).
        redirected_relu_steps: the first steps use redirected ReLU gradients.

    Returns:
        The optimised images, a float32 tensor like ``images``.
    """
    rate = tf.constant(learning_rate, tf.float32)
    shape = images.shape

    def loop(first, stop, images, redirect_relu):
        def step(iteration, images):
            _, gradients = objective.value_and_gradients_graph(images, redirect_relu=redirect_relu)
            images = regularizers(images + rate * gradients, gradients, iteration)
            return iteration + 1, tf.ensure_shape(images, shape)

        _, images = tf.while_loop(lambda iteration, _: iteration < stop, step,
                                  (tf.constant(first, tf.int32), images))
        return images

    # Two loops rather than a switch inside one: the plain steps keep TensorFlow's own
    # ReLU, which its graph optimiser fuses with the convolution before it.
    redirected = max(0, min(redirected_relu_steps, no_of_iterations))
    if redirected:
        images = loop(0, redirected, images, True)
    if no_of_iterations > redirected:
        images = loop(redirected, no_of_iterations, images, False)
    return images


def gradient_ascent(objective, images, learning_rate, no_of_iterations, regularizers,
                    redirected_relu_steps=REDIRECTED_RELU_STEPS):
    """Raise each image's objective: ``x += learning_rate * grad``, then regularise, repeatedly.

    Compiles ``ascent_graph`` for this one call; a ``DeepVisualizationModel``
    compiles it once for many calls.

    Args:
        objective: a ``UnitObjective`` (or any object with ``value_and_gradients_graph``).
        images: float32 start images, one per unit of the objective.
        learning_rate: step size of the gradient ascent.
        no_of_iterations: number of steps.
        regularizers: a ``Regularizers`` (or any callable ``(images, gradients, iteration)``
            on tensors).
        redirected_relu_steps: the first steps use redirected ReLU gradients.

    Returns:
        The optimised images, float32 numpy array, same shape as ``images``.
    """
    ascent = tf.function(lambda start: ascent_graph(
        objective, start, learning_rate, no_of_iterations, regularizers, redirected_relu_steps),
        autograph=False)
    return ascent(tf.convert_to_tensor(images, tf.float32)).numpy()


class DeepVisualizationModel:
    """Deep visualization of fixed units and settings, built once and run many times.

    The objective and the compiled optimisation loop (all iterations, the
    regularisers and the final activations in one graph, traced at the first
    call) are built once and read the model's weights, so a callback can call
    this after every few batches of training. Arguments as ``deep_visualization``.
    """

    def __init__(self, model, units_to_visualize, learning_rate, no_of_iterations, l2_decay=0,
                 blur_interval=0, blur_std=0, value_percentile=0, norm_percentile=0,
                 contribution_percentile=0, abs_contribution_percentile=0):
        check_regularizers(learning_rate, no_of_iterations, l2_decay, blur_interval, blur_std,
                           value_percentile, norm_percentile, contribution_percentile,
                           abs_contribution_percentile)
        self.objective = UnitObjective(model, units_to_visualize)
        self.regularizers = Regularizers(l2_decay, blur_interval, blur_std, value_percentile,
                                         norm_percentile, contribution_percentile,
                                         abs_contribution_percentile)
        self.learning_rate = learning_rate
        self.no_of_iterations = no_of_iterations
        self.input_shape = tuple(model.inputs[0].shape[1:])
        units = len(self.objective.units)
        self._optimise = tf.function(
            self._optimise_graph,
            input_signature=[tf.TensorSpec((units,) + self.input_shape, tf.float32)],
            # Plain Python around explicit tf.while_loop / tf.cond: no AutoGraph, whose
            # source transformation took most of the 2-5 s of the first trace.
            autograph=False)

    def _optimise_graph(self, start):
        images = ascent_graph(self.objective, start, self.learning_rate, self.no_of_iterations,
                              self.regularizers)
        return images, self.objective.values(images)

    def __call__(self, seed=None):
        """The list of ``(image, layer_name, unit_index, loss_value)``; see ``deep_visualization``."""
        start = random_noise_images(self.input_shape, len(self.objective.units), seed)
        images, values = self._optimise(tf.convert_to_tensor(start))
        images, values = images.numpy(), values.numpy()
        return [(image, layer_name, index, float(value)) for image, layer_name, (_, index), value
                in zip(images, self.objective.layer_names, self.objective.units, values)]


def deep_visualization(model, units_to_visualize, learning_rate, no_of_iterations, l2_decay=0,
                       blur_interval=0, blur_std=0, value_percentile=0, norm_percentile=0,
                       contribution_percentile=0, abs_contribution_percentile=0, seed=None):
    """Synthetic images that maximally activate the chosen units (Yosinski et al.).

    All units are optimised together as one batch, one image per unit, from
    seeded Gaussian noise (``parameterization.START_NOISE_STD``). Output-layer
    units maximise the pre-softmax score. A regulariser set to 0 is off;
    Table 2.1 of the thesis lists four useful combinations.

    Args:
        model: a built Keras model with one input of fixed shape.
        units_to_visualize: list of ``(layer_no, index)``; ``index`` an int for
            layers with 1-D output, a ``(row, col, channel)`` tuple for 3-D output.
        learning_rate: gradient ascent step size (> 0).
        no_of_iterations: number of steps (int >= 1).
        l2_decay: in [0, 1]; every step ``x *= (1 - l2_decay)``.
        blur_interval: blur every this many steps (int >= 0).
        blur_std: standard deviation of the Gaussian blur (>= 0).
        value_percentile: zero this percentage of values with the smallest |x|.
        norm_percentile: zero this percentage of pixels with the smallest norm.
        contribution_percentile: zero this percentage of pixels with the
            smallest contribution (sum over channels of x * grad).
        abs_contribution_percentile: the same with the absolute contribution.
        seed: int seed of the start noise, or None.

    Returns:
        List in the order of ``units_to_visualize`` of ``(image float32 (H, W, C)
        in model-input space, layer_name, unit_index, loss_value)``, where
        ``loss_value`` is the unit's activation for the final image.
    """
    return DeepVisualizationModel(
        model, units_to_visualize, learning_rate, no_of_iterations, l2_decay, blur_interval,
        blur_std, value_percentile, norm_percentile, contribution_percentile,
        abs_contribution_percentile)(seed)
