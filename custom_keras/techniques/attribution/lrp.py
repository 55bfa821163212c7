"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019, "Layer-Wise
Relevance Propagation: An Overview").

The relevance of the explained class starts as its pre-softmax score and flows back
layer by layer, conserved up to what biases and the stabiliser absorb. Dense and
convolution layers use the chosen rule; their activation, dropout and other
element-wise activation layers pass relevance through unchanged; layers that only
move or select values (flatten, reshape, concatenate, padding, max pooling) pass it
to the values they took, absorbing none; every other layer without weights (average
pooling, add...) and batch normalisation share it in proportion to their inputs'
contributions (the epsilon rule through the layer itself, exact for linear layers).
Each rule is computed with the gradient trick: for z = f(x), the relevance of x is
x * (J_f^T (R / z)), one vector-Jacobian product per layer.
"""
import keras
import numpy as np
import tensorflow as tf

from custom_keras.techniques.attribution.graph import (broadcast_bias, call, chosen_scores, compiled,
                                                       is_kernel_layer, linear, prepare, score_node,
                                                       scores_visit, signature, walk)

RULES = ("epsilon", "alpha_beta", "z_plus")
FIRST_LAYER_RULES = RULES + ("z_b",)

# Layers whose output relevance is their input's: element-wise activations and the
# layers that are the identity in inference.
_PASS_THROUGH = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
                 keras.layers.PReLU, keras.layers.Softmax, keras.layers.Dropout,
                 keras.layers.GaussianNoise, keras.layers.GaussianDropout, keras.layers.AlphaDropout,
                 keras.layers.ActivityRegularization, keras.layers.InputLayer)
# Layers that only move, copy or select values: relevance follows the values, with no
# stabiliser, so none is absorbed.
_REARRANGING = (keras.layers.Flatten, keras.layers.Reshape, keras.layers.Permute,
                keras.layers.Concatenate,
                keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
                keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Cropping3D,
                keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
                keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
                keras.layers.GlobalMaxPooling3D)
# Layers with weights that the epsilon rule through the layer itself still treats right.
_AFFINE_WITH_WEIGHTS = (keras.layers.BatchNormalization,)


def _stabilised(z, epsilon):
    """z moved ``epsilon`` away from 0 on its own side (0 counts as positive); with
    ``epsilon=0`` only exact zeros change (to 1: they carry no relevance)."""
    if epsilon == 0:
        return tf.where(z == 0, tf.ones_like(z), z)
    return z + epsilon * tf.where(z >= 0, 1.0, -1.0)


def _relevance_through(function, inputs, relevance, epsilon, bias=None):
    """The epsilon rule for ``z = function(*inputs)``: R_i = x_i * (J^T (R / stab(z + bias))),
    where a bias (broadcast to z) takes its share of the relevance."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        z = function(*inputs)
    denominator = z if bias is None else z + bias
    gradients = tape.gradient(z, inputs, output_gradients=relevance / _stabilised(denominator, epsilon))
    return [x * g for x, g in zip(inputs, gradients)]


def _kernel_relevance(layer, x, relevance, rule, epsilon, alpha, beta, bounds):
    """The relevance of a Dense or convolution layer's input under ``rule``."""
    kernel = layer.kernel
    bias = layer.bias if layer.use_bias else None
    positive_kernel, negative_kernel = tf.nn.relu(kernel), -tf.nn.relu(-kernel)

    def through(kernel):
        return lambda x: linear(layer, x, kernel, None)

    if rule == "epsilon":
        return _relevance_through(through(kernel), [x], relevance, epsilon,
                                  None if bias is None else broadcast_bias(layer, bias))[0]
    if rule == "z_plus":
        return _relevance_through(through(positive_kernel), [tf.nn.relu(x)], relevance, epsilon)[0]
    if rule == "z_b":
        low, high = tf.fill(tf.shape(x), float(bounds[0])), tf.fill(tf.shape(x), float(bounds[1]))
        return tf.add_n(_relevance_through(
            lambda x, low, high: (linear(layer, x, kernel, None) - linear(layer, low, positive_kernel, None)
                                  - linear(layer, high, negative_kernel, None)),
            [x, low, high], relevance, epsilon))
    # alpha_beta: the positive contributions (x+ w+, x- w-, the bias if positive) share
    # alpha times the relevance, the negative ones (x+ w-, x- w+, a negative bias) -beta times.
    positive_x, negative_x = tf.nn.relu(x), -tf.nn.relu(-x)
    positive_bias = negative_bias = None
    if bias is not None:
        positive_bias = broadcast_bias(layer, tf.nn.relu(bias))
        negative_bias = broadcast_bias(layer, -tf.nn.relu(-bias))
    parts = []
    for weight, kernels, bias_part in ((alpha, (positive_kernel, negative_kernel), positive_bias),
                                       (-beta, (negative_kernel, positive_kernel), negative_bias)):
        if weight == 0:
            continue
        for_positive, for_negative = kernels
        shares = _relevance_through(
            lambda p, n: linear(layer, p, for_positive, None) + linear(layer, n, for_negative, None),
            [positive_x, negative_x], relevance, epsilon, bias_part)
        parts.append(weight * tf.add_n(shares))
    return tf.add_n(parts)


def _check(rule, epsilon, alpha, beta, first_layer_rule, bounds):
    if rule not in RULES:
        raise ValueError("rule must be one of %s, got %r" % (", ".join(RULES), rule))
    if first_layer_rule is not None and first_layer_rule not in FIRST_LAYER_RULES:
        raise ValueError("first_layer_rule must be None or one of %s, got %r"
                         % (", ".join(FIRST_LAYER_RULES), first_layer_rule))
    if not np.isscalar(epsilon) or not epsilon > 0:
        raise ValueError("epsilon must be a number > 0, got %r" % (epsilon,))
    if rule == "alpha_beta" and not (np.isscalar(alpha) and np.isscalar(beta) and beta >= 0
                                     and np.isclose(alpha - beta, 1)):
        raise ValueError("the alpha_beta rule needs beta >= 0 and alpha - beta = 1 (conservation), "
                         "got alpha=%r, beta=%r" % (alpha, beta))
    if first_layer_rule == "z_b" and not (len(bounds) == 2 and bounds[0] < bounds[1]):
        raise ValueError("bounds must be (lowest, highest) input value, got %r" % (bounds,))


def lrp(model, images, rule="epsilon", epsilon=1e-6, alpha=1, beta=0, first_layer_rule=None,
        class_index=None, labels=None, bounds=(0.0, 1.0)):
    """Layer-wise relevance propagation of a class's pre-softmax score.

    Args:
        model: a built Keras model with one input and one output of class scores
            (N, classes), made of Dense and Conv layers, their activations, pooling,
            flatten, dropout, batch normalisation, add, concatenate and the like.
        images: float32 (N, ...) as the model's input.
        rule: the rule at every Dense and convolution layer: "epsilon" (LRP-ε),
            "alpha_beta" (LRP-αβ) or "z_plus" (LRP-z+, deep Taylor for ReLU networks).
        epsilon: the stabiliser added to every denominator (ε of LRP-ε).
        alpha, beta: the weights of positive and negative contributions for
            "alpha_beta", with alpha - beta = 1.
        first_layer_rule: None (``rule`` there too), a rule name, or "z_b": the
            z^B rule for inputs bounded by ``bounds``, at the layers the input enters.
        class_index: None (each image's predicted class), an int (that class) or
            "label" (each image's true class, from ``labels``).
        labels: the true classes when ``class_index="label"``: ints (N,) or one-hot (N, classes).
        bounds: (lowest, highest) input value, for ``first_layer_rule="z_b"``.

    Returns:
        float32 (N, H, W, C): each input value's relevance, unnormalised; without
        biases, with LRP-ε they sum to the class's score (up to ε).
    """
    _check(rule, epsilon, alpha, beta, first_layer_rule, bounds)
    images, classes = prepare(model, images, class_index, labels)
    scoring = score_node(model)
    visit_scores = scores_visit(model)
    for layer in _layers(model):
        if layer.weights and not is_kernel_layer(layer) and not isinstance(layer, _AFFINE_WITH_WEIGHTS):
            raise ValueError("lrp does not know how relevance passes through layer %r (%s)"
                             % (layer.name, type(layer).__name__))

    def graph(images, classes):
        steps = []

        def visit(node, layer, args, kwargs):
            outputs = visit_scores(node, layer, args, kwargs)
            steps.append((node, layer, args, kwargs, outputs))
            return outputs

        (scores,), _ = walk(model, images, visit)
        _, chosen = chosen_scores(scores, classes)
        relevances = {id(scores): tf.one_hot(chosen, scores.shape[-1]) * scores}
        for node, layer, args, kwargs, outputs in reversed(steps):
            relevance = relevances.pop(id(outputs), None) if tf.is_tensor(outputs) else None
            if relevance is None:
                continue
            inputs = [x for x in tf.nest.flatten(args) if tf.is_tensor(x)]
            if is_kernel_layer(layer):
                layer_rule = first_layer_rule if first_layer_rule and inputs[0] is images else rule
                shares = [_kernel_relevance(layer, inputs[0], relevance, layer_rule, epsilon, alpha, beta,
                                            bounds)]
            elif isinstance(layer, _PASS_THROUGH) or (node is scoring and outputs is inputs[0]):
                shares = [relevance]
            else:
                shares = _relevance_through(lambda *xs: call(layer, _refill(args, xs), kwargs), inputs,
                                            relevance, 0 if isinstance(layer, _REARRANGING) else epsilon)
            for x, share in zip(inputs, shares):
                relevances[id(x)] = relevances[id(x)] + share if id(x) in relevances else share
        return relevances.get(id(images), tf.zeros_like(images))

    key = ("lrp", rule, float(epsilon), float(alpha), float(beta), first_layer_rule,
           tuple(map(float, bounds)))
    run = compiled(model, key, graph, signature(model))
    return run(tf.constant(images), tf.constant(classes)).numpy()


def _refill(args, tensors):
    """``args`` with its tensors replaced, in order, by ``tensors``."""
    tensors = iter(tensors)
    return tf.nest.map_structure(lambda x: next(tensors) if tf.is_tensor(x) else x, args)


def _layers(model):
    """Every layer of the model, inside nested models too."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer
