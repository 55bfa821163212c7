"""The visualization inputs of a run: images from the images folder, or the script's array.

A model's input kind follows from its one input's shape: ``(H, W, C)`` is an
"image", ``(T, C)`` a "sequence", ``(F,)`` "tabular". Images come from the
run's images folder (resized and converted, see ``custom_keras.images``) or
from ``visualization_inputs``; sequences and tabular rows only from
``visualization_inputs``, an array ``(N,) + input shape`` already as the model
expects it (no preprocessing is applied to it).
"""
import numpy as np

from custom_keras import images as visualization_images
from custom_keras.techniques.common import check_images, to_uint8

INPUT_KINDS = {3: "image", 2: "sequence", 1: "tabular"}


class NotApplicable(ValueError):
    """A technique cannot serve this model or these inputs; the message says why, in one line."""


def input_kind(model):
    """"image", "sequence" or "tabular" for a built model with one input.

    Raises:
        NotApplicable: the model has several inputs, or an input of another rank.
    """
    inputs = model.inputs
    if len(inputs) != 1:
        raise NotApplicable("the model has %d inputs; the visualizations need a model with one "
                            "input" % len(inputs))
    shape = tuple(inputs[0].shape[1:])
    if len(shape) not in INPUT_KINDS:
        raise NotApplicable("the model's input has shape %s per sample; the visualizations take "
                            "images (H, W, C), sequences (T, C) or feature vectors (F,)" % (shape,))
    return INPUT_KINDS[len(shape)]


def check_inputs_array(visualization_inputs):
    """``visualization_inputs`` as a float32 array (N, ...) with N >= 1, or None; checked
    without the model (its shape is checked against the model when training begins)."""
    if visualization_inputs is None:
        return None
    try:
        array = np.asarray(visualization_inputs, dtype=np.float32)
    except (TypeError, ValueError):
        raise TypeError("visualization_inputs must be a numeric array (N, ...) as fed to the "
                        "model, got %r" % (type(visualization_inputs).__name__,)) from None
    if array.ndim < 2 or array.shape[0] == 0:
        raise ValueError("visualization_inputs must be a batch (N,) + the model's input shape with "
                         "N >= 1, got shape %s" % (array.shape,))
    if not np.all(np.isfinite(array)):
        raise ValueError("visualization_inputs holds NaN or infinite values")
    return array


def input_names(count):
    return ["input_%d" % i for i in range(count)]


def prepare_inputs(model, loaded_images, visualization_inputs, custom_preprocess=None):
    """The inputs every visualization of this model gets.

    Args:
        model: the built Keras model.
        loaded_images: {image name: PIL image} from the images folder (may be empty).
        visualization_inputs: the script's float32 array, or None.
        custom_preprocess: applied to the folder's images only.

    Returns:
        (kind, names, {name: uint8 (H, W, C)} for images else None, float32 batch).

    Raises:
        NotApplicable: there is nothing to show this model (the message says what to give).
        ValueError: the array does not fit the model, or ``custom_preprocess`` misbehaves.
    """
    kind = input_kind(model)
    if visualization_inputs is not None:
        batch = check_images(model, visualization_inputs, "visualization_inputs")
        names = input_names(len(batch))
        as_fed = {name: to_uint8(x) for name, x in zip(names, batch)} if kind == "image" else None
        return kind, names, as_fed, batch
    if kind != "image":
        raise NotApplicable(
            "needs visualization_inputs: a model with %s input %s takes its visualization inputs "
            "from the script, CustomCallbacks(..., visualization_inputs=array of shape (N,) + %s)"
            % (kind, tuple(model.inputs[0].shape[1:]), tuple(model.inputs[0].shape[1:])))
    if not loaded_images:
        raise NotApplicable("needs an image: the images folder holds none and the script gave no "
                            "visualization_inputs")
    names, as_fed, batch = visualization_images.prepare_images(model, loaded_images,
                                                               custom_preprocess)
    return kind, names, as_fed, batch
