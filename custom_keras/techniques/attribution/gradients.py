"""Gradient attributions: guided backpropagation (and guided Grad-CAM), SmoothGrad and
Integrated Gradients, each of a class's pre-softmax score w.r.t. the input."""
import keras
import numpy as np
import tensorflow as tf

from custom_keras.techniques.attribution.cam import grad_cam
from custom_keras.techniques.attribution.graph import (chosen_scores, compiled, is_int, prepare,
                                                       score_node, scores_visit, signature, walk)

# Images x samples (or steps) per forward pass, so that memory stays bounded.
_BATCH = 128


def _score_gradients(model, images, classes, visit):
    """The gradient of each image's chosen pre-softmax score w.r.t. that image."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(images)
        (scores,), _ = walk(model, images, visit)
        score, _ = chosen_scores(scores, classes)
        # Each image's score depends on that image only: one gradient of the sum serves all.
        total = tf.reduce_sum(score)
    return tape.gradient(total, images)


def is_relu(layer):
    """Whether the layer ends in a plain ReLU: ReLU(), Activation("relu") or activation="relu"."""
    if isinstance(layer, keras.layers.ReLU):
        return not layer.max_value and not layer.negative_slope and not layer.threshold
    activation = getattr(layer, "activation", None)
    return activation is keras.activations.relu or getattr(activation, "__name__", "") == "relu"


@tf.custom_gradient
def _positive_gradient(outputs):
    """The identity, whose backward pass keeps only the positive gradient: placed after a
    ReLU, the ReLU's own gradient adds the forward mask, which is guided backpropagation."""
    return tf.identity(outputs), tf.nn.relu


def guided_backprop(model, images, class_index=None, labels=None):
    """Guided backpropagation (Springenberg et al. 2015) of a class's pre-softmax score.

    Through every ReLU the backward pass keeps only positive gradients at positive
    inputs. The model is not changed: the walk wraps each ReLU's output instead.

    Args:
        model: a built Keras model with one input and one output of class scores (N, classes).
        images: float32 (N, ...) as the model's input.
        class_index: None (each image's predicted class), an int (that class) or
            "label" (each image's true class, from ``labels``).
        labels: the true classes when ``class_index="label"``: ints (N,) or one-hot (N, classes).

    Returns:
        float32 (N, H, W, C): the guided gradient, unnormalised.
    """
    images, classes = prepare(model, images, class_index, labels)
    scoring = score_node(model)
    visit_scores = scores_visit(model)

    def visit(node, layer, args, kwargs):
        outputs = visit_scores(node, layer, args, kwargs)
        return _positive_gradient(outputs) if node is not scoring and is_relu(layer) else outputs

    def graph(images, classes):
        return _score_gradients(model, images, classes, visit)

    run = compiled(model, ("guided_backprop",), graph, signature(model))
    return run(tf.constant(images), tf.constant(classes)).numpy()


def guided_grad_cam(model, images, layer_no=None, class_index=None, labels=None):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation times the Grad-CAM map.

    Args: as ``grad_cam``.

    Returns:
        float32 (N, H, W, C): ``guided_backprop(...) * grad_cam(...)[..., None]``.
    """
    return (guided_backprop(model, images, class_index, labels)
            * grad_cam(model, images, layer_no, class_index, labels)[..., np.newaxis])


def _in_chunks(run, per_call, images, *rest):
    """``run`` over slices of at most ``per_call`` images, concatenated."""
    return np.concatenate([run(*(array[start:start + per_call] for array in (images,) + rest))
                           for start in range(0, len(images), per_call)])


def smooth_grad(model, images, samples=50, noise=0.2, class_index=None, seed=None, labels=None):
    """SmoothGrad (Smilkov et al. 2017): the signed mean of the gradients of noisy copies.

    Args:
        model, images, class_index, labels: as ``guided_backprop``.
        samples: noisy copies per image.
        noise: the noise's standard deviation as a fraction of each image's value
            range (max - min), the paper's noise level.
        seed: an int for reproducible noise; None draws one.

    Returns:
        float32 (N, H, W, C): the mean gradient over the samples, signed, unnormalised.
    """
    if not (is_int(samples) and samples >= 1):
        raise ValueError("samples must be an int >= 1, got %r" % (samples,))
    if not np.isscalar(noise) or not np.isfinite(noise) or noise < 0:
        raise ValueError("noise must be a number >= 0, got %r" % (noise,))
    images, classes = prepare(model, images, class_index, labels)
    visit = scores_visit(model)
    seed = np.random.default_rng().integers(2 ** 31) if seed is None else seed

    def graph(images, classes, samples, noise, seed):
        axes = list(range(1, len(images.shape)))
        sigma = noise * (tf.reduce_max(images, axis=axes, keepdims=True)
                         - tf.reduce_min(images, axis=axes, keepdims=True))
        noisy = tf.repeat(images, samples, axis=0)
        noisy += tf.repeat(sigma, samples, axis=0) * tf.random.stateless_normal(tf.shape(noisy), seed)
        gradients = _score_gradients(model, noisy, tf.repeat(classes, samples), visit)
        return tf.reduce_mean(tf.reshape(gradients, tf.concat([[-1, samples], tf.shape(images)[1:]], 0)),
                              axis=1)

    run = compiled(model, ("smooth_grad",), graph, signature(
        model, tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.float32),
        tf.TensorSpec((2,), tf.int32)))
    seeds = np.array([seed % 2 ** 31, 0], dtype=np.int32)

    def chunk(images, classes):
        seeds[1] += 1  # other noise for each chunk
        return run(tf.constant(images), tf.constant(classes), tf.constant(samples, tf.int32),
                   tf.constant(noise, tf.float32), tf.constant(seeds)).numpy()
    return _in_chunks(chunk, max(1, _BATCH // samples), images, classes)


def _baselines(baseline, images):
    if isinstance(baseline, str):
        if baseline != "black":
            raise ValueError('baseline must be "black", a number or an array like one image, got %r'
                             % baseline)
        return np.zeros_like(images)
    try:
        return np.broadcast_to(np.asarray(baseline, dtype=np.float32), images.shape).copy()
    except (TypeError, ValueError):
        raise ValueError('baseline must be "black", a number or an array of shape %s or %s, got %r'
                         % (images.shape[1:], images.shape, np.shape(baseline))) from None


def integrated_gradients(model, images, steps=64, baseline="black", class_index=None, labels=None):
    """Integrated Gradients (Sundararajan et al. 2017) of a class's pre-softmax score.

    The path integral from the baseline to the image is taken by the trapezoidal rule
    over ``steps`` evenly spaced points, both ends included (as Xplique does).

    Args:
        model, images, class_index, labels: as ``guided_backprop``.
        steps: points on the path, >= 2.
        baseline: "black" (zeros), a number (a constant image) or an array shaped
            like one image (or like ``images``).

    Returns:
        float32 (N, H, W, C): (image - baseline) times the mean gradient along the path;
        they sum to score(image) - score(baseline) up to the rule's error.
    """
    if not (is_int(steps) and steps >= 2):
        raise ValueError("steps must be an int >= 2, got %r" % (steps,))
    images, classes = prepare(model, images, class_index, labels)
    baselines = _baselines(baseline, images)
    visit = scores_visit(model)

    def graph(images, classes, baselines, steps):
        shape = tf.shape(images)
        alphas = tf.reshape(tf.linspace(0.0, 1.0, steps), [1, -1] + [1] * (len(images.shape) - 1))
        paths = baselines[:, tf.newaxis] + alphas * (images - baselines)[:, tf.newaxis]
        gradients = _score_gradients(model, tf.reshape(paths, tf.concat([[-1], shape[1:]], 0)),
                                     tf.repeat(classes, steps), visit)
        gradients = tf.reshape(gradients, tf.concat([[-1, steps], shape[1:]], 0))
        mean = tf.reduce_mean((gradients[:, :-1] + gradients[:, 1:]) / 2.0, axis=1)
        return (images - baselines) * mean

    run = compiled(model, ("integrated_gradients",), graph, signature(
        model, tf.TensorSpec((None,) + images.shape[1:], tf.float32), tf.TensorSpec((), tf.int32)))
    return _in_chunks(lambda images, classes, baselines: run(
        tf.constant(images), tf.constant(classes), tf.constant(baselines),
        tf.constant(steps, tf.int32)).numpy(), max(1, _BATCH // steps), images, classes, baselines)
