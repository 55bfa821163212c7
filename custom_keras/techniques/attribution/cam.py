"""Class activation maps: Grad-CAM, Grad-CAM++ and Score-CAM over a layer with a spatial output.

Each weighs the layer's feature maps A_k (N, h, w, K) by how much they matter to the
class, sums them, keeps the positive part and resizes the (h, w) map bilinearly to
the input's height and width.
"""
import numpy as np
import tensorflow as tf

from custom_keras.techniques.attribution.graph import (chosen_scores, compiled, is_int, layer_output,
                                                       prepare, resize, scores_visit, signature,
                                                       spatial_layer_no, walk)


def _feature_maps_and_gradients(model, layer_no, images, classes):
    """The layer's feature maps, the gradients of the chosen scores w.r.t. them, and the classes."""
    target = layer_output(model, layer_no)
    visit = scores_visit(model)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(images)
        (scores,), tensors = walk(model, images, visit)
        feature_maps = tensors[id(target)]
        score, chosen = chosen_scores(scores, classes)
        # Each image's score depends on that image only: one gradient of the sum serves all.
        total = tf.reduce_sum(score)
    return feature_maps, tape.gradient(total, feature_maps), chosen


def _grad_cam_weights(feature_maps, gradients):
    """Grad-CAM (Selvaraju et al. 2017): each map weighted by its mean gradient."""
    return tf.reduce_mean(gradients, axis=(1, 2))


def _grad_cam_plus_plus_weights(feature_maps, gradients):
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19), on the score itself.

    The paper differentiates exp(score); its derivatives are exp(score) times the
    score's, which cancels in alpha and only scales each image's map by exp(score)
    (which overflows for large scores), so it is left out.
    """
    squares = tf.square(gradients)
    sums = tf.reduce_sum(feature_maps, axis=(1, 2), keepdims=True)
    denominator = 2.0 * squares + sums * squares * gradients
    alphas = squares / tf.where(denominator == 0.0, tf.ones_like(denominator), denominator)
    return tf.reduce_sum(alphas * tf.nn.relu(gradients), axis=(1, 2))


def _cam(model, images, layer_no, class_index, labels, weigh, key):
    layer_no = spatial_layer_no(model, layer_no)
    images, classes = prepare(model, images, class_index, labels)

    def graph(images, classes):
        feature_maps, gradients, _ = _feature_maps_and_gradients(model, layer_no, images, classes)
        weights = weigh(feature_maps, gradients)
        return resize(tf.nn.relu(tf.einsum("nhwk,nk->nhw", feature_maps, weights)), images)

    run = compiled(model, (key, layer_no), graph, signature(model))
    return run(tf.constant(images), tf.constant(classes)).numpy()


def grad_cam(model, images, layer_no=None, class_index=None, labels=None):
    """Grad-CAM maps (Selvaraju et al. 2017) of a class's pre-softmax score.

    Args:
        model: a built Keras model with one image input and one output of class scores (N, classes).
        images: float32 (N, H, W, C) as the model's input.
        layer_no: index into ``model.layers`` of a layer with a spatial output;
            None: the last such layer.
        class_index: None (each image's predicted class), an int (that class) or
            "label" (each image's true class, from ``labels``).
        labels: the true classes when ``class_index="label"``: ints (N,) or one-hot (N, classes).

    Returns:
        float32 (N, H, W): ReLU(sum_k mean(dS/dA_k) A_k), resized bilinearly, unnormalised.
    """
    return _cam(model, images, layer_no, class_index, labels, _grad_cam_weights, "grad_cam")


def grad_cam_plus_plus(model, images, layer_no=None, class_index=None, labels=None):
    """Grad-CAM++ maps (Chattopadhyay et al. 2018) of a class's pre-softmax score.

    Args: as ``grad_cam``.

    Returns:
        float32 (N, H, W): ReLU(sum_k w_k A_k) with w_k = sum_ij alpha_ij^k ReLU(dS/dA_ij^k)
        and alpha = g^2 / (2 g^2 + sum_ab A_ab g^3), resized bilinearly, unnormalised.
    """
    return _cam(model, images, layer_no, class_index, labels, _grad_cam_plus_plus_weights,
                "grad_cam_plus_plus")


def score_cam(model, images, layer_no=None, class_index=None, max_maps=None, labels=None,
              batch_size=64):
    """Score-CAM maps (Wang et al. 2020): each feature map weighted by the class's softmax
    probability on the input masked by that map.

    Each map A_k is resized to the input, scaled to 0..1 and multiplies the image;
    the model's softmax probability of the class on that masked image is A_k's weight.

    Args:
        model, images, layer_no, class_index, labels: as ``grad_cam``.
        max_maps: None (every feature map) or the number of maps to use per image,
            those with the largest spatial standard deviation (as tf-keras-vis' max_N).
        batch_size: masked images per forward pass.

    Returns:
        float32 (N, H, W): ReLU(sum_k p_k A_k), resized bilinearly, unnormalised.
    """
    layer_no = spatial_layer_no(model, layer_no)
    images, classes = prepare(model, images, class_index, labels)
    target = layer_output(model, layer_no)
    channels = target.shape[-1]
    if max_maps is not None and not (is_int(max_maps) and 1 <= max_maps <= channels):
        raise ValueError("max_maps must be None or an int in 1..%d (the layer's channels), got %r"
                         % (channels, max_maps))
    visit = scores_visit(model)

    def maps_graph(images, classes):
        (scores,), tensors = walk(model, images, visit)
        return tensors[id(target)], chosen_scores(scores, classes)[1]

    def probabilities_graph(images, classes):
        (scores,), _ = walk(model, images, visit)
        # A single score is a sigmoid's logit: its probability is the sigmoid.
        probabilities = tf.nn.softmax(scores) if scores.shape[-1] > 1 else tf.sigmoid(scores)
        return tf.gather(probabilities, classes, axis=1, batch_dims=1)

    feature_maps, chosen = compiled(model, ("score_cam_maps", layer_no), maps_graph,
                                    signature(model))(tf.constant(images), tf.constant(classes))
    probabilities = compiled(model, ("score_cam_probabilities",), probabilities_graph, signature(model))
    feature_maps, chosen = feature_maps.numpy(), chosen.numpy()
    cams = []
    for image, maps, class_no in zip(images, feature_maps, chosen):
        if max_maps is not None:
            maps = maps[..., np.argsort(-maps.std(axis=(0, 1)), kind="stable")[:max_maps]]
        masks = tf.image.resize(np.moveaxis(maps, -1, 0)[..., np.newaxis], image.shape[:2],
                                method="bilinear").numpy()
        low = masks.min(axis=(1, 2, 3), keepdims=True)
        high = masks.max(axis=(1, 2, 3), keepdims=True)
        masks = (masks - low) / np.where(high > low, high - low, 1.0)
        weights = np.concatenate([
            probabilities(tf.constant(image * masks[start:start + batch_size]),
                          tf.fill([len(masks[start:start + batch_size])], class_no)).numpy()
            for start in range(0, len(masks), batch_size)])
        cams.append(np.maximum(np.tensordot(maps, weights, axes=([-1], [0])), 0))
    return resize(tf.constant(np.stack(cams), tf.float32), images).numpy()
