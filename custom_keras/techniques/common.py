"""Small pieces the techniques share: layer lookup, pre-softmax scores, scaling to uint8."""
import contextlib

import keras
import numpy as np


def get_layer(model, layer_no, argument="layer_no"):
    """``model.layers[layer_no]`` with a clear error naming the argument."""
    if not isinstance(layer_no, (int, np.integer)) or isinstance(layer_no, bool):
        raise TypeError("%s must be an int index into model.layers, got %r" % (argument, layer_no))
    if not 0 <= layer_no < len(model.layers):
        raise ValueError("%s=%d is out of range: the model has layers 0..%d (%s)" % (
            argument, layer_no, len(model.layers) - 1,
            ", ".join("%d: %s" % (i, l.name) for i, l in enumerate(model.layers))))
    return model.layers[layer_no]


def model_inputs(model):
    """The model's input tensor (or list, for several), for building sub-models without warnings."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def is_softmax(activation):
    return activation is keras.activations.softmax or getattr(activation, "__name__", "") == "softmax"


def is_sigmoid(activation):
    return getattr(activation, "__name__", "") == "sigmoid"


def _squashes(layer, is_output):
    """Whether ``layer``'s activation is left out of its score: softmax, and sigmoid on a
    model output (a binary classifier's probability saturates where its logit does not)."""
    activation = getattr(layer, "activation", None)
    return is_softmax(activation) or (is_output and is_sigmoid(activation))


def _is_softmax_layer(layer, is_output):
    """A layer whose only job is softmax (or an output's sigmoid): keras.layers.Softmax or
    Activation('softmax')."""
    return isinstance(layer, keras.layers.Softmax) or (
        isinstance(layer, keras.layers.Activation) and _squashes(layer, is_output))


@contextlib.contextmanager
def _linear_activation(layer):
    """Temporarily replace a layer's softmax (or sigmoid) activation by the identity.

    Keras layers read ``self.activation`` when they are called, so a score
    function called (or traced) inside this context yields pre-softmax values
    while sharing the layer's variables with the training model.
    """
    with swapped_activations([] if layer is None else [layer], keras.activations.linear):
        yield


@contextlib.contextmanager
def swapped_activations(layers, activation):
    """Temporarily give ``layers`` another activation; Keras layers read it when called.

    The originals are put back also when the code inside fails.
    """
    originals = [layer.activation for layer in layers]
    for layer in layers:
        layer.activation = activation
    try:
        yield
    finally:
        for layer, original in zip(layers, originals):
            layer.activation = original


class LayerScore:
    """Images -> output of ``model.layers[layer_no]``, pre-softmax where that output is a softmax.

    Handles softmax inside the layer (``Dense(10, activation="softmax")``) and
    softmax as its own layer (then the score is that layer's input). A sigmoid
    that makes a model output (``Dense(1, activation="sigmoid")``) is left out
    the same way: the score is the logit. The sub-model is built once and
    shares the trained model's variables.

    Attributes:
        linear_layer: the layer whose activation is the identity while the score
            runs, or None.

    Args:
        model: a built Keras model (Sequential or Functional).
        layer_no: index into ``model.layers``.
    """

    def __init__(self, model, layer_no):
        self.layer = get_layer(model, layer_no)
        self.linear_layer = None
        is_output = any(self.layer.output is output for output in model.outputs)
        if _is_softmax_layer(self.layer, is_output):
            output = self.layer.input
        else:
            output = self.layer.output
            if _squashes(self.layer, is_output):
                self.linear_layer = self.layer
        self.model = keras.Model(model_inputs(model), output)

    def __call__(self, images, training=False):
        with _linear_activation(self.linear_layer):
            return self.model(images, training=training)


def softmax(scores):
    """The softmax of a vector of scores, float64, stable for large scores."""
    scores = np.asarray(scores, dtype=np.float64)
    exponentials = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def to_uint8(array):
    """Scale an array to 0..255 by its own minimum and maximum (a constant array becomes 0)."""
    array = np.asarray(array, dtype=np.float64)
    low, high = np.min(array), np.max(array)
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)


def scale_by_max(array):
    """Scale a non-negative array to 0..255 by its maximum (all zeros stay zeros)."""
    array = np.asarray(array, dtype=np.float64)
    high = np.max(array) if array.size else 0.0
    if not np.isfinite(high) or high <= 0:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round(np.clip(array, 0, None) * (255.0 / high)).astype(np.uint8)


def single_input(model):
    """The input tensor of a built model with one input, or a clear error."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        raise ValueError("the model is not built yet: give it an Input, call model.build(input_shape) "
                         "or train it on data first") from None
    if len(inputs) != 1:
        raise ValueError("the model has %d inputs; the visualizations need a model with one input"
                         % len(inputs))
    return inputs[0]


def check_images(model, images, argument="images"):
    """``images`` as float32 (N, ...) matching the model's single input, or a clear error.

    Args:
        model: a built Keras model with one input.
        images: array-like batch of images, already preprocessed for the model.
        argument: the argument name to use in error messages.

    Returns:
        The images as a float32 numpy array.
    """
    expected = tuple(single_input(model).shape)
    try:
        images = np.asarray(images, dtype=np.float32)
    except (TypeError, ValueError):
        raise TypeError("%s must be a numeric array of shape (N,) + %s" % (argument, expected[1:])) from None
    if images.ndim != len(expected) or images.shape[0] == 0 or any(
            want is not None and want != got for want, got in zip(expected[1:], images.shape[1:])):
        raise ValueError("%s must have shape (N,) + %s with N >= 1 to fit the model's input, got %s"
                         % (argument, expected[1:], images.shape))
    return images
