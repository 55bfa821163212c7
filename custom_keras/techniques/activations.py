"""Layer activations: every layer's output for the visualization images, as uint8 pictures.

One multi-output Keras model, built once over the trained model's layers (so it
shares their weights and always shows the current state of training), gives
every shown layer's output in a single forward pass.

What is shown and how it is scaled, per image and per layer (all filters of a
layer on one scale, so their brightness can be compared):

- 3-D outputs (H, W, C) become uint8 (C, H, W): one grey map per filter.
- 1-D outputs (units,) become uint8 (units,): one pixel per unit.
- 2-D outputs (T, C) (Conv1D, pooling over time, recurrent layers that return
  sequences) become uint8 (C, T): one row per filter over time.
- A layer whose outputs are all >= 0 (ReLU, pooling of ReLU, softmax) is
  scaled by its maximum: 0 stays black, the maximum becomes 255, so a dead
  filter stays black at every stage of training.
- A layer with any negative output (linear, tanh, batch normalisation) is
  scaled from its minimum (black) to its maximum (255); clipping negatives
  to black would hide half of what such a layer computes.
- Layers with any other output rank (Conv3D) or with several outputs have
  no picture in this format: they are skipped and listed, with the reason,
  in ``ActivationModel.skipped_layers`` (and a warning says so once, when
  the model is built).
- A layer used at several places in the model shows its first use.
"""
import warnings

import keras
import numpy as np
import tensorflow as tf

from custom_keras.techniques.common import check_images, scale_by_max, single_input, to_uint8

EXCLUDE_LAYERS = (keras.layers.InputLayer, keras.layers.Dropout, keras.layers.Flatten)


def scale_layer_output(output):
    """One image's output of one layer as uint8, scaled as the module docstring describes.

    Args:
        output: float array (H, W, C), (T, C) or (units,).

    Returns:
        uint8 array (C, H, W), (C, T) or (units,).
    """
    output = np.asarray(output)
    if output.ndim in (2, 3):  # channels first: one map or row per filter
        output = np.moveaxis(output, -1, 0)
    if output.size and np.min(output) < 0:
        return to_uint8(output)
    return scale_by_max(output)


def check_exclude_layers(exclude_layers):
    try:
        exclude_layers = tuple(exclude_layers)
    except TypeError:
        raise TypeError("exclude_layers must be a tuple of Keras layer classes, got %r"
                        % (exclude_layers,)) from None
    for layer_class in exclude_layers:
        if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
            raise TypeError("exclude_layers must hold Keras layer classes such as keras.layers.Dropout, "
                            "got %r" % (layer_class,))
    return exclude_layers


class ActivationModel:
    """Images -> the uint8 activations of every layer not excluded, from one forward pass.

    Build it once (for example when training starts) and call it at every stage.

    Args:
        model: a built Keras model (Sequential or Functional) with one input.
        exclude_layers: tuple of layer classes not to show.

    Attributes:
        layer_names: ``"Layer <no>: <name>"`` of every shown layer, ``<no>`` indexing ``model.layers``.
        skipped_layers: ``(layer_name, reason)`` for layers that cannot be shown.
    """

    def __init__(self, model, exclude_layers=EXCLUDE_LAYERS):
        exclude_layers = check_exclude_layers(exclude_layers)
        inputs = single_input(model)
        self.model = model
        self.layer_names = []
        self.skipped_layers = []
        outputs = []
        for layer_no, layer in enumerate(model.layers):
            if isinstance(layer, exclude_layers):
                continue
            layer_name = "Layer %d: %s" % (layer_no, layer.name)
            reason = self._reason_to_skip(layer.output)
            if reason:
                self.skipped_layers.append((layer_name, reason))
                continue
            self.layer_names.append(layer_name)
            outputs.append(layer.output)
        if self.skipped_layers:
            warnings.warn("layer activations skip: " + "; ".join(
                "%s (%s)" % skipped for skipped in self.skipped_layers))
        if not outputs:
            raise ValueError("no layer activations to show: exclude_layers=%r leaves no layer with a "
                             "1-D, 2-D or 3-D output" % (exclude_layers,))
        self._activations = keras.Model(inputs, outputs)
        # The multi-output forward pass as one graph, traced at the first call; the
        # fixed signature (any batch size) never retraces, and the graph reads the
        # model's variables, so it follows training.
        signature = [tf.TensorSpec((None,) + tuple(inputs.shape[1:]), tf.float32)]
        self._forward = tf.function(self._forward_graph, input_signature=signature,
                                    autograph=False)

    def _forward_graph(self, images):
        # keras.tree.flatten: a model with one output returns a tensor, not a list of one.
        return keras.tree.flatten(self._activations(images, training=False))

    @staticmethod
    def _reason_to_skip(output):
        if not isinstance(output, keras.KerasTensor):
            return "the layer has several outputs"
        rank = len(output.shape) - 1
        if rank not in (1, 2, 3):
            return ("its output has %d dimensions per input; only (units,), (T, C) and (H, W, C) "
                    "are shown" % rank)
        return None

    def __call__(self, images):
        """Layer activations for each image.

        Args:
            images: float32 (N, ...) as the model's input (images, sequences or rows).

        Returns:
            A list with one entry per image: ``[(layer_name, uint8 array), ...]``
            with (C, H, W) arrays for 3-D outputs and (units,) for 1-D ones.
        """
        images = check_images(self.model, images)
        outputs = [output.numpy() for output in self._forward(tf.convert_to_tensor(images))]
        return [[(name, scale_layer_output(output[image_no]))
                 for name, output in zip(self.layer_names, outputs)]
                for image_no in range(len(images))]


def layer_activations(model, images, exclude_layers=EXCLUDE_LAYERS):
    """The uint8 activations of every layer not excluded, for each image.

    Builds an ``ActivationModel``; keep one instead when calling this repeatedly.

    Args:
        model: a built Keras model (Sequential or Functional) with one input.
        images: float32 (N, ...) as the model's input (images, sequences or rows).
        exclude_layers: tuple of layer classes not to show.

    Returns:
        A list with one entry per image: ``[("Layer 1: conv2d", uint8 (filters, H, W)),
        ("Layer 6: dense", uint8 (units,)), ...]``.
    """
    return ActivationModel(model, exclude_layers)(images)
