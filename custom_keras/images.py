"""Loading the visualization images of a run and converting them for a model.

Every image in ``<run>/images/`` is visualized. Each is resized to the model's
input size and converted to its number of channels (grey <-> RGB) with Pillow,
then scaled to [0, 1] or passed through the user's ``custom_preprocess``.
"""
import os

import numpy as np
from PIL import Image

from custom_keras import storage

# Pillow mode for each number of input channels.
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def load_images(run_dir):
    """Open every image in ``<run_dir>/images/``, oldest first (the last is the newest).

    Args:
        run_dir: the run folder.

    Returns:
        {image name: PIL image, fully loaded}; empty when the folder holds none.

    Raises:
        ValueError: Pillow cannot read one of them.
    """
    folder = storage.images_dir(run_dir)
    names = storage.list_images(run_dir)
    images = {}
    for name in names:
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as image:
                image.load()
                images[name] = image.copy()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError("visualization image %s in the images folder cannot be read: %s"
                             % (path, error)) from error
    return images


def model_image_shape(model):
    """(height, width, channels) of a model's image input; height or width may be None.

    Raises:
        ValueError: the model's input is not one image of 1, 3 or 4 channels.
    """
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        # A Sequential model without an Input is built by its first batch,
        # after stage 0 should already have been visualized.
        raise ValueError("model: the model has no input shape before training; start it with "
                         "keras.Input((height, width, channels)) or call model.build((None, "
                         "height, width, channels)) before fit") from None
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise ValueError(
            "model: the visualizations need a model with one image input (batch, height, width, "
            "channels), this model's inputs are %s" % [tuple(i.shape) for i in inputs])
    height, width, channels = tuple(inputs[0].shape)[1:]
    if channels not in _MODES:
        raise ValueError("model: the visualizations support images of 1, 3 or 4 channels, "
                         "the model's input has %s" % channels)
    return height, width, channels


def to_model_size(image, shape):
    """One PIL image as uint8 (H, W, C) in the model's input size and channels.

    Args:
        image: a PIL image.
        shape: (height, width, channels) from ``model_image_shape``; a None
            height or width keeps the image's own size.
    """
    height, width, channels = shape
    converted = image.convert(_MODES[channels])
    size = (width or converted.width, height or converted.height)
    if converted.size != size:
        converted = converted.resize(size, Image.BILINEAR)
    return np.asarray(converted, dtype=np.uint8).reshape(size[1], size[0], channels)


def prepare_images(model, images, custom_preprocess=None):
    """The images as fed to the model and as a model-ready batch.

    Args:
        model: the built Keras model.
        images: {image name: PIL image} from ``load_images``.
        custom_preprocess: optional function float32 (H, W, C) in 0..255 -> array
            the model expects; replaces the default scaling to [0, 1].

    Returns:
        (names, {image name: uint8 (H, W, C)}, float32 batch (N, H, W, C)).

    Raises:
        ValueError: the model has no image input, or ``custom_preprocess``
            returns an array of another shape.
    """
    shape = model_image_shape(model)
    names = list(images)
    as_fed = {name: to_model_size(images[name], shape) for name in names}
    if len({array.shape for array in as_fed.values()}) > 1:
        raise ValueError("images: the model accepts any size, so every visualization image "
                         "must have the same size; got %s"
                         % {name: array.shape for name, array in as_fed.items()})
    inputs = []
    for name in names:
        array = as_fed[name].astype(np.float32)
        if custom_preprocess is None:
            inputs.append(array / 255.0)
            continue
        processed = np.asarray(custom_preprocess(array), dtype=np.float32)
        if processed.shape != array.shape:
            raise ValueError("custom_preprocess must return an array of the model's input shape "
                             "%s, it returned shape %s for image %s"
                             % (array.shape, processed.shape, name))
        inputs.append(processed)
    return names, as_fed, np.stack(inputs)
