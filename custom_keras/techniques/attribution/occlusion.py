"""Occlusion (Zeiler and Fergus 2014): how much a class's score falls when a patch is covered."""
import numpy as np
import tensorflow as tf

from custom_keras.techniques.attribution.graph import (compiled, is_int, prepare, scores_visit, signature,
                                                       walk)

_BATCH = 128  # occluded images per forward pass


def occlusion(model, images, patch=8, stride=4, value=0, class_index=None, labels=None):
    """Occlusion maps of a class's pre-softmax score.

    Each ``patch`` x ``patch`` square, every ``stride`` pixels from the top left corner
    while it fits (Xplique's placement), is replaced by ``value`` in every channel;
    a pixel's attribution is the sum, over the patches that cover it, of the score
    of the image minus the score of the occluded image.

    Args:
        model: a built Keras model with one image input and one output of class scores (N, classes).
        images: float32 (N, H, W, C) as the model's input.
        patch: the square's side in pixels.
        stride: pixels between two squares.
        value: what replaces the covered pixels.
        class_index: None (each image's predicted class), an int (that class) or
            "label" (each image's true class, from ``labels``).
        labels: the true classes when ``class_index="label"``: ints (N,) or one-hot (N, classes).

    Returns:
        float32 (N, H, W), unnormalised.
    """
    images, classes = prepare(model, images, class_index, labels)
    if images.ndim != 4:
        raise ValueError("occlusion needs images (N, height, width, channels), got shape %s"
                         % (images.shape,))
    height, width = images.shape[1:3]
    for name, size in (("patch", patch), ("stride", stride)):
        if not (is_int(size) and 1 <= size <= min(height, width)):
            raise ValueError("%s must be an int in 1..%d, got %r" % (name, min(height, width), size))
    visit = scores_visit(model)

    def graph(images, classes):
        (scores,), _ = walk(model, images, visit)
        predicted = tf.argmax(scores, axis=-1, output_type=tf.int32)
        return scores, tf.where(classes < 0, predicted, classes)

    run = compiled(model, ("occlusion",), graph, signature(model))
    scores, chosen = (array.numpy() for array in run(tf.constant(images), tf.constant(classes)))
    corners = [(top, left) for top in range(0, height - patch + 1, stride)
               for left in range(0, width - patch + 1, stride)]
    maps = np.zeros(images.shape[:3], dtype=np.float64)
    for image_no, (image, class_no) in enumerate(zip(images, chosen)):
        for start in range(0, len(corners), _BATCH):
            batch = corners[start:start + _BATCH]
            occluded = np.repeat(image[np.newaxis], len(batch), axis=0)
            for copy, (top, left) in zip(occluded, batch):
                copy[top:top + patch, left:left + patch] = value
            occluded_scores = run(tf.constant(occluded), tf.fill([len(batch)], class_no))[0].numpy()
            drops = scores[image_no, class_no] - occluded_scores[:, class_no]
            for drop, (top, left) in zip(drops, batch):
                maps[image_no, top:top + patch, left:left + patch] += drop
    return maps.astype(np.float32)
