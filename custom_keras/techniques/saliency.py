"""Saliency maps (Simonyan et al. 2014): which input pixels move the predicted class's score.

The score is the predicted class's PRE-softmax value (a softmax inside the last
Dense layer or as its own layer is left out), because the softmax probability
also falls when other classes rise, which mixes their evidence into the map.
The gradient of that score with respect to the input is turned into a picture:
its absolute value (or only its positive or negative part), the maximum over
the colour channels, scaled per image so that its maximum is 255.
"""
import numpy as np
import tensorflow as tf

from custom_keras.techniques.common import (LayerScore, check_images, scale_by_max, single_input,
                                            softmax)

MODES = ("absolute", "positive", "negative")


def _output_layer_no(model):
    outputs = model.outputs
    if len(outputs) != 1:
        raise ValueError("saliency maps need a model with one output, this one has %d" % len(outputs))
    if len(outputs[0].shape) != 2:
        raise ValueError("saliency maps need a model whose output is one score per class, shape "
                         "(N, classes); this one's output has shape %s" % (tuple(outputs[0].shape),))
    for layer_no, layer in enumerate(model.layers):
        if layer.output is outputs[0]:
            return layer_no
    raise ValueError("cannot find the layer that produces the model's output")


class SaliencyModel:
    """Images -> saliency maps of the predicted class, built once over the trained model's layers.

    Args:
        model: a built Keras model (Sequential or Functional) with one input
            and one output of class scores or probabilities, shape (N, classes).
    """

    def __init__(self, model):
        inputs = single_input(model)
        self.model = model
        self._score = LayerScore(model, _output_layer_no(model))
        # One graph for the forward and backward pass, traced at the first call and
        # reused at every later one: a fixed signature (any batch size) never retraces,
        # and the graph reads the model's variables, so it follows training.
        signature = [tf.TensorSpec((None,) + tuple(inputs.shape[1:]), tf.float32)]
        self._gradients = tf.function(self._gradients_graph, input_signature=signature,
                                      autograph=False)
        self._traced = None  # its one concrete function: called without the dispatch

    def _gradients_graph(self, images):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            scores = self._score(images, training=False)
            predicted = tf.argmax(scores, axis=-1)
            # Each image's score depends on that image only, so one gradient of the
            # sum gives every image its own gradient.
            chosen = tf.reduce_sum(tf.gather(scores, predicted, axis=1, batch_dims=1))
        return tape.gradient(chosen, images), tf.cast(scores, tf.float32)

    def gradients(self, images):
        """The un-scaled gradients of each image's predicted class score.

        Args:
            images: float32 (N, ...) as the model's input (images, sequences or rows).

        Returns:
            ``(gradients float32 (N, H, W, C), scores float32 (N, classes))``: the gradient of
            the predicted class's pre-softmax score w.r.t. the image, and the pre-softmax scores.
        """
        if self._traced is None:
            self._traced = self._gradients.get_concrete_function()
        gradients, scores = self._traced(tf.convert_to_tensor(check_images(self.model, images)))
        return gradients.numpy(), scores.numpy()

    def __call__(self, images, mode="absolute"):
        """Saliency maps, predicted classes and their confidences.

        Args:
            images: float32 (N, ...) as the model's input (images, sequences or rows).
            mode: "absolute" (abs of the gradient), "positive" (only pixels that raise the
                score) or "negative" (only pixels that lower it, by magnitude).

        Returns:
            ``(maps uint8 (N, H, W, 1), predicted_classes int64 (N,), confidences float32 (N,))``;
            a confidence is the softmax probability of the predicted class.
        """
        return self.maps_from(*self.gradients(images), mode=mode)

    @staticmethod
    def maps_from(gradients, scores, mode="absolute"):
        """``__call__``'s result from ``gradients()``'s: the maps, classes and confidences."""
        if mode not in MODES:
            raise ValueError("mode must be one of %s, got %r" % (", ".join(MODES), mode))
        if mode == "positive":
            gradients = np.maximum(gradients, 0)
        elif mode == "negative":
            gradients = np.maximum(-gradients, 0)
        else:
            gradients = np.abs(gradients)
        saliency = np.max(gradients, axis=-1, keepdims=True)
        maps = np.stack([scale_by_max(image_map) for image_map in saliency])
        predicted = np.argmax(scores, axis=-1).astype(np.int64)
        probabilities = softmax(scores)
        confidences = probabilities[np.arange(len(scores)), predicted].astype(np.float32)
        return maps, predicted, confidences


def saliency_maps(model, images, mode="absolute"):
    """Saliency maps of the predicted class for each image.

    Builds a ``SaliencyModel``; keep one instead when calling this repeatedly.

    Args:
        model: a built Keras model (Sequential or Functional) with one input
            and one output of class scores or probabilities, shape (N, classes).
        images: float32 (N, ...) as the model's input (images, sequences or rows).
        mode: "absolute", "positive" or "negative".

    Returns:
        ``(maps uint8 (N, H, W, 1), predicted_classes int64 (N,), confidences float32 (N,))``.
    """
    return SaliencyModel(model)(images, mode=mode)
