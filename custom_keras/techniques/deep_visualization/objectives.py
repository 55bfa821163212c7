"""The objective of deep visualization: each image's own unit activation.

Units are ``(layer_no, index)``: ``index`` an int for layers with 1-D output
(Dense), a ``(row, col, channel)`` tuple for 3-D output (Conv2D, pooling), in
general a tuple with one entry per output axis. Units of the output layer use
the pre-softmax score, as a softmax unit can grow by pushing the other classes
down instead of finding its own features (and an output sigmoid's logit, which
does not saturate).

A ReLU that is off passes no gradient, so a unit that is off for its start
image would stay black for ever (the thesis' own example result has two such
units with activation 0.0). As Lucid does, the first steps can use a
redirected ReLU gradient that also lets gradient through an off ReLU where it
would switch it on; the forward pass, and so every reported value, is unchanged.
"""

import keras
import numpy as np
import tensorflow as tf

from custom_keras.techniques import common


@tf.custom_gradient
def redirected_relu(x):
    """ReLU whose gradient also reaches inputs below 0 where it pushes them up.

    Per image: where the ordinary ReLU gradient is non-zero somewhere in the
    image it is used unchanged; where it is zero everywhere (all the gradient's
    paths are off), the gradient passes except where it would push a negative
    input further down (Lucid's ``redirected_relu_grad``, for gradient ascent).
    """
    def gradient(upstream):
        below_zero = x < 0
        relu_gradient = tf.where(below_zero, tf.zeros_like(upstream), upstream)
        redirected = tf.where(below_zero & (upstream < 0), tf.zeros_like(upstream), upstream)
        batch = tf.shape(x)[:1]
        passes = tf.reduce_any(tf.reshape(relu_gradient != 0, tf.concat([batch, [-1]], 0)), 1)
        passes = tf.reshape(passes, tf.concat([batch, tf.ones([tf.rank(x) - 1], tf.int32)], 0))
        return tf.where(passes, relu_gradient, redirected)
    return tf.nn.relu(x), gradient


def _is_relu(activation):
    return activation is keras.activations.relu or getattr(activation, "__name__", "") == "relu"


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _output_shape(layer, argument):
    """Shape of one sample of the layer's output, e.g. ``(26, 26, 32)``."""
    try:
        output = layer.output
    except (AttributeError, ValueError) as error:
        raise ValueError("%s: layer %r has no single output (%s)" % (argument, layer.name, error))
    if isinstance(output, (list, tuple)):
        raise ValueError("%s: layer %r has several outputs; choose a layer with one" % (
            argument, layer.name))
    return tuple(output.shape[1:])


def check_unit_list(units_to_visualize):
    """Raise TypeError naming the argument unless it is a non-empty list of
    ``(layer_no, index)`` pairs with int layer numbers; what needs the model is
    ``check_units``'s."""
    if not isinstance(units_to_visualize, (list, tuple)) or not units_to_visualize:
        raise TypeError("units_to_visualize must be a non-empty list of (layer_no, index) tuples, "
                        "got %r" % (units_to_visualize,))
    for position, unit in enumerate(units_to_visualize):
        argument = "units_to_visualize[%d]" % position
        if not isinstance(unit, (list, tuple)) or len(unit) != 2:
            raise TypeError("%s must be a (layer_no, index) tuple, got %r" % (argument, unit))
        if not _is_int(unit[0]):
            raise TypeError("%s layer_no must be an int index into model.layers, got %r"
                            % (argument, unit[0]))


def check_units(model, units_to_visualize):
    """Raise ValueError/TypeError naming the argument unless every unit exists in the model.

    Args:
        model: a built Keras model.
        units_to_visualize: list of ``(layer_no, index)``; ``index`` an int for
            layers with 1-D output, a tuple with one int per axis (``(row, col,
            channel)``) for layers with 3-D output.
    """
    check_unit_list(units_to_visualize)
    if len(model.inputs) != 1 or None in tuple(model.inputs[0].shape[1:]):
        raise ValueError("model: deep visualization needs one input of fixed shape, got %s" % (
            [tuple(x.shape) for x in model.inputs],))
    for position, unit in enumerate(units_to_visualize):
        argument = "units_to_visualize[%d]" % position
        if not isinstance(unit, (list, tuple)) or len(unit) != 2:
            raise TypeError("%s must be a (layer_no, index) tuple, got %r" % (argument, unit))
        layer_no, index = unit
        layer = common.get_layer(model, layer_no, argument + " layer_no")
        shape = _output_shape(layer, argument)
        if len(shape) == 1:
            if not _is_int(index):
                raise TypeError("%s: layer %d (%s) has 1-D output %s, so the index must be an "
                                "int, got %r" % (argument, layer_no, layer.name, shape, index))
            index = (index,)
        elif not isinstance(index, (list, tuple)) or len(index) != len(shape) or not all(
                _is_int(i) for i in index):
            raise TypeError("%s: layer %d (%s) has %d-D output %s, so the index must be a tuple "
                            "of %d ints (e.g. (row, col, channel)), got %r" % (
                                argument, layer_no, layer.name, len(shape), shape, len(shape),
                                index))
        if not all(size is None or 0 <= i < size for i, size in zip(index, shape)):
            raise ValueError("%s: index %r is out of range for layer %d (%s) with output shape "
                             "%s" % (argument, unit[1], layer_no, layer.name, shape))


def unit_index(index):
    """The index as stored in the results: an int, or a tuple of ints."""
    if _is_int(index):
        return int(index)
    return tuple(int(i) for i in index)


class UnitObjective:
    """Images -> each image's own unit activation, with gradients, in one pass.

    Image ``i`` of a batch belongs to ``units[i]``. All chosen layers are
    outputs of ONE multi-output model that shares the trained model's weights,
    and one gradient call gives every image the gradient of its own unit (the
    images do not interact: the model runs in inference mode). Built once, it
    stays valid while the model trains.

    Args:
        model: a built Keras model with one input.
        units: list of ``(layer_no, index)``, checked with ``check_units``.
    """

    def __init__(self, model, units):
        check_units(model, units)
        self.units = [(layer_no, unit_index(index)) for layer_no, index in units]
        self.layer_names = [model.layers[layer_no].name for layer_no, _ in self.units]
        layer_nos = sorted({layer_no for layer_no, _ in self.units})
        scores = [common.LayerScore(model, layer_no) for layer_no in layer_nos]
        self.model = keras.Model(common.model_inputs(model),
                                 [score.model.outputs[0] for score in scores])
        # LayerScore's rule: a softmax (or an output's sigmoid) inside a chosen layer is the
        # identity while the objective runs (a multi-output model needs it for all layers at once).
        self._softmax_layers = [score.linear_layer for score in scores
                                if score.linear_layer is not None]
        self._relu_layers = [layer for layer in model.layers
                             if _is_relu(getattr(layer, "activation", None))]
        # For every layer: which images belong to it, and where their units are.
        self._rows, self._positions = [], []
        for layer_no in layer_nos:
            rows = [i for i, unit in enumerate(self.units) if unit[0] == layer_no]
            self._rows.append(tf.constant([[i] for i in rows]))
            self._positions.append(tf.constant(
                [[i] + np.atleast_1d(self.units[i][1]).tolist() for i in rows]))
        # Compiled once (any batch size, so no retracing) for calls from outside a graph.
        signature = [tf.TensorSpec((None,) + tuple(model.inputs[0].shape[1:]), tf.float32)]
        self._values_function = tf.function(self._values, input_signature=signature,
                                            autograph=False)

    def __call__(self, images):
        """Each image's unit activation: float32 numpy array (N,); image i belongs to units[i]."""
        return self._values_function(tf.convert_to_tensor(images, tf.float32)).numpy()

    def values(self, images):
        """Each image's unit activation as a tensor; for use inside a graph."""
        return self._values(images)

    def value_and_gradients_graph(self, images, redirect_relu=False):
        """(activations (N,), gradients like ``images``) as tensors; for use inside a graph
        (the ReLU swap is traced into it)."""
        if redirect_relu:
            return self._value_and_redirected_graph(images)
        return self._value_and_gradients_graph(images)

    def _value_and_redirected_graph(self, images):
        # The swap is traced into the graph; the model is restored right after.
        with common.swapped_activations(self._relu_layers, redirected_relu):
            return self._value_and_gradients_graph(images)

    def _value_and_gradients_graph(self, images):
        # Only the images' gradient is wanted: the tape does not follow the weights.
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            values = self._values(images)
            # Each image's value depends on that image only, so the gradient of
            # the sum gives every image the gradient of its own unit.
            total = tf.reduce_sum(values)
        return values, tape.gradient(total, images)

    def _values(self, images):
        with common.swapped_activations(self._softmax_layers, keras.activations.linear):
            outputs = self.model(images, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        values = tf.zeros(tf.shape(images)[:1], tf.float32)
        for output, rows, positions in zip(outputs, self._rows, self._positions):
            unit_values = tf.gather_nd(tf.cast(output, tf.float32), positions)
            values += tf.scatter_nd(rows, unit_values, tf.shape(values))
        return values
