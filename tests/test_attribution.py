"""The attribution methods from first principles, on tiny models: hand-computed values,
conservation and completeness, the model left as found, and Adebayo et al.'s sanity check."""
import gc
import os
import weakref

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from custom_keras.techniques import attribution  # noqa: E402
from custom_keras.techniques.common import LayerScore  # noqa: E402

SHAPE = (8, 8, 2)
CLASSES = 3


def seeded(seed):
    keras.utils.set_random_seed(seed)
    return np.random.default_rng(seed)


def small_cnn(seed=0):
    """Two same-padded ReLU convs (the last one at the input's resolution), Dense softmax."""
    seeded(seed)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def branched_nested(use_bias=True, seed=0):
    """A base model used as a layer, then two branches (max pooling, a conv) joined by
    Add and Concatenate, batch normalisation and a separate Softmax layer."""
    seeded(seed)
    base = keras.Sequential([keras.Input(SHAPE),
                             keras.layers.Conv2D(4, 3, padding="same", use_bias=use_bias),
                             keras.layers.ReLU()], name="base")
    inputs = keras.Input(SHAPE)
    features = base(inputs)
    pooled = keras.layers.MaxPooling2D(2)(features)
    convolved = keras.layers.Conv2D(4, 2, strides=2, activation="relu", use_bias=use_bias)(features)
    joined = keras.layers.Concatenate()([keras.layers.Add()([pooled, convolved]), pooled])
    x = keras.layers.Flatten()(joined)
    x = keras.layers.Dense(6, activation="relu", use_bias=use_bias)(x)
    x = keras.layers.Dense(CLASSES, use_bias=use_bias)(x)
    return keras.Model(inputs, keras.layers.Softmax()(x))


def sequential_around_a_base(seed=0):
    """A Sequential whose first layer is a functional base model (with batch
    normalisation), then global pooling and a binary classifier's sigmoid."""
    seeded(seed)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    base = keras.Model(inputs, keras.layers.Conv2D(4, 3, activation="relu")(x))
    return keras.Sequential([keras.Input(SHAPE), base, keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(1, activation="sigmoid")])


def images(count=3, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (count,) + SHAPE).astype(np.float32)


def pre_softmax(model, batch):
    """The pre-softmax scores through the project's existing machinery."""
    return LayerScore(model, len(model.layers) - 1)(batch).numpy()


ALL_METHODS = {
    "grad_cam": lambda model, x, **kw: attribution.grad_cam(model, x, **kw),
    "grad_cam_plus_plus": lambda model, x, **kw: attribution.grad_cam_plus_plus(model, x, **kw),
    "score_cam": lambda model, x, **kw: attribution.score_cam(model, x, **kw),
    "guided_backprop": lambda model, x, **kw: attribution.guided_backprop(model, x, **kw),
    "guided_grad_cam": lambda model, x, **kw: attribution.guided_grad_cam(model, x, **kw),
    "smooth_grad": lambda model, x, **kw: attribution.smooth_grad(model, x, samples=8, seed=3, **kw),
    "integrated_gradients": lambda model, x, **kw: attribution.integrated_gradients(model, x, steps=16, **kw),
    "occlusion": lambda model, x, **kw: attribution.occlusion(model, x, patch=2, stride=2, **kw),
    "lrp": lambda model, x, **kw: attribution.lrp(model, x, **kw),
    "lrp_alpha_beta": lambda model, x, **kw: attribution.lrp(
        model, x, rule="alpha_beta", alpha=2, beta=1, first_layer_rule="z_b", **kw),
    "lrp_z_plus": lambda model, x, **kw: attribution.lrp(model, x, rule="z_plus", **kw),
}
PER_CHANNEL = {"guided_backprop", "guided_grad_cam", "smooth_grad", "integrated_gradients",
               "lrp", "lrp_alpha_beta", "lrp_z_plus"}


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
@pytest.mark.parametrize("build", [small_cnn, branched_nested, sequential_around_a_base])
def test_every_method_gives_one_float32_map_per_image_at_the_input_size(name, build):
    model = build()
    maps = ALL_METHODS[name](model, images())
    expected = (3,) + SHAPE if name in PER_CHANNEL else (3,) + SHAPE[:2]
    assert maps.dtype == np.float32 and maps.shape == expected
    assert np.all(np.isfinite(maps)) and np.any(maps != 0)


def last_conv_features_and_gradients(model, batch):
    """The last conv layer's maps and the gradients of the predicted class's logit (by hand)."""
    feature_model = keras.Model(model.inputs[0], model.get_layer("last_conv").output)
    dense = model.layers[-1]
    features = tf.constant(feature_model(batch))
    with tf.GradientTape() as tape:
        tape.watch(features)
        logits = tf.matmul(tf.reshape(features, (len(batch), -1)), dense.kernel) + dense.bias
        chosen = tf.reduce_sum(tf.reduce_max(logits, axis=1))
    return features.numpy(), tape.gradient(chosen, features).numpy()


def test_grad_cam_of_the_last_conv_layer_is_the_channel_weighted_sum_computed_by_hand():
    model, batch = small_cnn(), images()
    features, gradients = last_conv_features_and_gradients(model, batch)
    weights = gradients.mean(axis=(1, 2))
    expected = np.maximum(np.einsum("nhwk,nk->nhw", features, weights), 0)
    np.testing.assert_allclose(attribution.grad_cam(model, batch), expected, rtol=1e-4, atol=1e-6)


def test_grad_cam_plus_plus_follows_the_papers_formula():
    model, batch = small_cnn(), images()
    a, g = (array.astype(np.float64) for array in last_conv_features_and_gradients(model, batch))
    denominator = 2 * g ** 2 + a.sum(axis=(1, 2), keepdims=True) * g ** 3
    alphas = g ** 2 / np.where(denominator == 0, 1, denominator)
    weights = (alphas * np.maximum(g, 0)).sum(axis=(1, 2))
    expected = np.maximum(np.einsum("nhwk,nk->nhw", a, weights), 0)
    np.testing.assert_allclose(attribution.grad_cam_plus_plus(model, batch), expected, rtol=1e-4, atol=1e-6)


def score_cam_by_hand(model, image, max_maps=None):
    features = keras.Model(model.inputs[0], model.get_layer("last_conv").output)(image[np.newaxis]).numpy()[0]
    if max_maps:
        features = features[..., np.argsort(-features.std(axis=(0, 1)))[:max_maps]]
    low, high = features.min(axis=(0, 1)), features.max(axis=(0, 1))
    masks = (features - low) / np.where(high > low, high - low, 1)
    masked = image[np.newaxis] * np.moveaxis(masks, -1, 0)[..., np.newaxis]
    predicted = np.argmax(model(image[np.newaxis]).numpy()[0])
    weights = model(masked).numpy()[:, predicted]  # the model's own softmax
    return np.maximum(features @ weights, 0)


def test_score_cam_weighs_each_map_by_the_softmax_probability_of_the_masked_image():
    model = small_cnn()
    batch = images(2)
    np.testing.assert_allclose(attribution.score_cam(model, batch),
                               [score_cam_by_hand(model, image) for image in batch], rtol=1e-4, atol=1e-6)


def test_score_cam_with_max_maps_uses_the_maps_of_largest_spread_only():
    model = small_cnn()
    batch = images(2)
    np.testing.assert_allclose(attribution.score_cam(model, batch, max_maps=2),
                               [score_cam_by_hand(model, image, 2) for image in batch], rtol=1e-4, atol=1e-6)


def dense_relu_network(seed=0):
    seeded(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, activation="relu")(inputs)
    x = keras.layers.Dense(4, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(x))


def dense_weights(model):
    return [(layer.kernel.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64))
            for layer in model.layers[1:]]


def test_guided_backprop_is_the_explicit_relu_masked_backward_pass():
    model = dense_relu_network()
    rows = np.random.default_rng(2).normal(size=(4, 5)).astype(np.float32)
    (w1, b1), (w2, b2), (w3, b3) = dense_weights(model)
    expected = []
    for x in rows.astype(np.float64):
        z1 = x @ w1 + b1
        z2 = np.maximum(z1, 0) @ w2 + b2
        logits = np.maximum(z2, 0) @ w3 + b3
        g = w3[:, np.argmax(logits)]
        g = w2 @ (g * (z2 > 0) * (g > 0))
        expected.append(w1 @ (g * (z1 > 0) * (g > 0)))
    np.testing.assert_allclose(attribution.guided_backprop(model, rows), expected, rtol=1e-4, atol=1e-6)


def test_guided_grad_cam_is_guided_backprop_times_grad_cam():
    model = branched_nested()
    batch = images()
    np.testing.assert_allclose(attribution.guided_grad_cam(model, batch, layer_no=4),
                               attribution.guided_backprop(model, batch)
                               * attribution.grad_cam(model, batch, layer_no=4)[..., np.newaxis], rtol=1e-6)


def input_gradients(model, batch, class_no):
    batch = tf.constant(batch)
    with tf.GradientTape() as tape:
        tape.watch(batch)
        chosen = tf.reduce_sum(LayerScore(model, len(model.layers) - 1)(batch)[:, class_no])
    return tape.gradient(chosen, batch).numpy()


def test_smooth_grad_without_noise_is_the_signed_gradient_and_a_seed_repeats_it():
    model = small_cnn()
    batch = images()
    plain = attribution.smooth_grad(model, batch, samples=4, noise=0.0, class_index=1)
    np.testing.assert_allclose(plain, input_gradients(model, batch, 1), rtol=1e-4, atol=1e-6)
    assert np.any(plain < 0)
    noisy = attribution.smooth_grad(model, batch, samples=4, noise=0.2, class_index=1, seed=5)
    np.testing.assert_array_equal(noisy, attribution.smooth_grad(model, batch, samples=4, class_index=1,
                                                                 seed=5))
    assert not np.allclose(noisy, plain)


@pytest.mark.parametrize("build", [small_cnn, branched_nested, sequential_around_a_base])
def test_integrated_gradients_sum_to_the_score_difference_within_one_percent(build):
    model = build()
    batch = images()
    for class_index in (0, model.outputs[0].shape[-1] - 1):
        maps = attribution.integrated_gradients(model, batch, steps=64, class_index=class_index)
        black = pre_softmax(model, 0 * batch[:1])[0, class_index]
        difference = pre_softmax(model, batch)[:, class_index] - black
        np.testing.assert_allclose(maps.sum(axis=(1, 2, 3)), difference, rtol=0.01, atol=1e-5)


def test_occlusion_adds_the_score_drop_of_every_patch_that_covers_a_pixel():
    model = small_cnn()
    batch = images(1)
    scores = pre_softmax(model, batch)[0]
    class_no = int(np.argmax(scores))
    expected = np.zeros(SHAPE[:2])
    for top in (0, 3):
        for left in (0, 3):
            occluded = batch.copy()
            occluded[0, top:top + 5, left:left + 5] = 0.25
            drop = scores[class_no] - pre_softmax(model, occluded)[0, class_no]
            expected[top:top + 5, left:left + 5] += drop
    np.testing.assert_allclose(attribution.occlusion(model, batch, patch=5, stride=3, value=0.25)[0],
                               expected, rtol=1e-4, atol=1e-5)


def test_lrp_epsilon_on_a_dense_network_matches_relevances_computed_by_hand():
    model = dense_relu_network()
    rows = np.random.default_rng(3).normal(size=(2, 5)).astype(np.float32)
    epsilon = 0.01
    expected = []
    for x in rows.astype(np.float64):
        activations = [x]
        for kernel, bias in dense_weights(model)[:-1]:
            activations.append(np.maximum(activations[-1] @ kernel + bias, 0))
        kernel, bias = dense_weights(model)[-1]
        logits = activations[-1] @ kernel + bias
        relevance = np.zeros(CLASSES)
        relevance[np.argmax(logits)] = logits.max()
        for (kernel, bias), a in zip(reversed(dense_weights(model)), reversed(activations)):
            z = a @ kernel + bias
            z = z + epsilon * np.where(z >= 0, 1, -1)
            # R_i = sum_j a_i w_ij / z_j R_j, written out
            relevance = np.array([sum(a[i] * kernel[i, j] / z[j] * relevance[j] for j in range(len(z)))
                                  for i in range(len(a))])
        expected.append(relevance)
    np.testing.assert_allclose(attribution.lrp(model, rows, epsilon=epsilon), expected, rtol=1e-4, atol=1e-6)


def test_lrp_alpha_beta_z_plus_and_z_b_on_a_dense_network_match_relevances_computed_by_hand():
    model = dense_relu_network(seed=4)
    rows = np.random.default_rng(4).uniform(0, 1, size=(2, 5)).astype(np.float32)
    weights = dense_weights(model)

    def by_hand(x, rule, first_rule):
        activations = [x]
        for kernel, bias in weights[:-1]:
            activations.append(np.maximum(activations[-1] @ kernel + bias, 0))
        logits = activations[-1] @ weights[-1][0] + weights[-1][1]
        relevance = np.zeros(CLASSES)
        relevance[np.argmax(logits)] = logits.max()
        for depth in range(len(weights) - 1, -1, -1):
            kernel, bias = weights[depth]
            a = activations[depth]
            layer_rule = first_rule if depth == 0 and first_rule else rule
            if layer_rule == "z_b":
                z_ij = a[:, None] * kernel - 0.0 * np.maximum(kernel, 0) - 1.0 * np.minimum(kernel, 0)
            elif layer_rule == "z_plus":
                z_ij = np.maximum(a, 0)[:, None] * np.maximum(kernel, 0)
            if layer_rule in ("z_b", "z_plus"):
                relevance = (z_ij / (z_ij.sum(axis=0) + 1e-9) * relevance).sum(axis=1)
                continue
            # alpha = 2, beta = 1, biases split by sign (a >= 0 after the ReLUs and in the inputs)
            contributions = a[:, None] * kernel
            positive, negative = np.maximum(contributions, 0), np.minimum(contributions, 0)
            positive_total = positive.sum(axis=0) + np.maximum(bias, 0) + 1e-9
            negative_total = negative.sum(axis=0) + np.minimum(bias, 0) - 1e-9
            relevance = (2 * positive / positive_total - 1 * negative / negative_total) @ relevance
        return relevance

    for rule, first_rule in (("alpha_beta", None), ("z_plus", None), ("z_plus", "z_b"), ("alpha_beta", "z_b")):
        expected = [by_hand(x, rule, first_rule) for x in rows.astype(np.float64)]
        got = attribution.lrp(model, rows, rule=rule, epsilon=1e-9, alpha=2, beta=1,
                              first_layer_rule=first_rule)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6, err_msg="%s %s" % (rule, first_rule))


def test_lrp_epsilon_on_a_conv_network_matches_relevances_computed_by_hand():
    seeded(5)
    model = keras.Sequential([keras.Input((3, 3, 1)), keras.layers.Conv2D(2, 2, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(CLASSES)])
    image = np.random.default_rng(5).uniform(0, 1, (1, 3, 3, 1)).astype(np.float32)
    kernel, bias = (w.astype(np.float64) for w in model.layers[0].get_weights())
    dense_kernel, dense_bias = (w.astype(np.float64) for w in model.layers[2].get_weights())
    x = image[0, ..., 0].astype(np.float64)
    epsilon = 0.01

    def stabilised(z):
        return z + epsilon * (1 if z >= 0 else -1)
    z = np.array([[[(x[i:i + 2, j:j + 2] * kernel[..., 0, k]).sum() + bias[k] for k in range(2)]
                   for j in range(2)] for i in range(2)])
    a = np.maximum(z, 0).reshape(-1)
    logits = a @ dense_kernel + dense_bias
    c = np.argmax(logits)
    hidden = np.array([a[i] * dense_kernel[i, c] / stabilised(logits[c]) * logits[c]
                       for i in range(8)]).reshape(2, 2, 2)
    expected = np.zeros((3, 3))
    for i in range(2):
        for j in range(2):
            for k in range(2):
                for di in range(2):
                    for dj in range(2):
                        expected[i + di, j + dj] += (x[i + di, j + dj] * kernel[di, dj, 0, k]
                                                     / stabilised(z[i, j, k]) * hidden[i, j, k])
    np.testing.assert_allclose(attribution.lrp(model, image, epsilon=epsilon)[0, ..., 0], expected,
                               rtol=1e-4, atol=1e-6)


def test_lrp_epsilon_conserves_the_score_through_branches_and_a_nested_model_without_biases():
    model = branched_nested(use_bias=False)
    batch = images()
    relevance = attribution.lrp(model, batch, epsilon=1e-9)
    np.testing.assert_allclose(relevance.sum(axis=(1, 2, 3)), pre_softmax(model, batch).max(axis=1), rtol=1e-4)


def test_the_class_is_the_predicted_one_a_fixed_one_or_the_label():
    model = small_cnn()
    batch = images()
    predicted = np.argmax(pre_softmax(model, batch), axis=1)
    by_class = np.stack([attribution.grad_cam(model, batch[i:i + 1], class_index=int(predicted[i]))[0]
                         for i in range(3)])
    np.testing.assert_allclose(attribution.grad_cam(model, batch), by_class, rtol=1e-5)
    labels = np.array([2, 0, 1])
    expected = np.stack([attribution.lrp(model, batch[i:i + 1], class_index=int(labels[i]))[0]
                         for i in range(3)])
    np.testing.assert_allclose(attribution.lrp(model, batch, class_index="label", labels=labels), expected,
                               rtol=1e-5)
    one_hot = np.eye(CLASSES)[labels]
    np.testing.assert_allclose(attribution.lrp(model, batch, class_index="label", labels=one_hot), expected,
                               rtol=1e-5)


@pytest.mark.parametrize("arguments, message", [
    ({"class_index": "label"}, "labels="),
    ({"class_index": 3}, "class numbers must be in 0..2"),
    ({"class_index": "best"}, 'class_index must be None, an int or "label"'),
    ({"class_index": "label", "labels": [0, 1]}, "labels must be 3 class numbers"),
])
def test_a_wrong_class_gets_a_clear_message(arguments, message):
    with pytest.raises((ValueError, TypeError), match=message):
        attribution.grad_cam(small_cnn(), images(), **arguments)


@pytest.mark.parametrize("call, message", [
    (lambda m, x: attribution.grad_cam(m, x, layer_no=4), "needs a spatial output"),
    (lambda m, x: attribution.lrp(m, x, rule="gamma"), "rule must be one of"),
    (lambda m, x: attribution.lrp(m, x, rule="alpha_beta", alpha=1, beta=1), "alpha - beta = 1"),
    (lambda m, x: attribution.score_cam(m, x, max_maps=6), "max_maps must be None or an int in 1..5"),
    (lambda m, x: attribution.integrated_gradients(m, x, baseline="white"), 'baseline must be "black"'),
    (lambda m, x: attribution.occlusion(m, x, patch=9), "patch must be an int in 1..8"),
    (lambda m, x: attribution.smooth_grad(m, x, samples=0), "samples must be an int >= 1"),
    (lambda m, x: attribution.guided_backprop(m, x[..., :1]), "images must have shape"),
])
def test_bad_arguments_get_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call(small_cnn(), images())


def snapshot(model):
    return ([w.copy() for w in model.get_weights()],
            [(layer, getattr(layer, "activation", None)) for layer in model.layers])


def assert_unchanged(model, before):
    weights, activations = before
    for now, then in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(now, then)
    assert [(layer, getattr(layer, "activation", None)) for layer in model.layers] == activations


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_every_method_leaves_the_model_as_it_found_it(name):
    model = branched_nested()
    before = snapshot(model)
    ALL_METHODS[name](model, images())
    assert_unchanged(model, before)


class SoftmaxScores(keras.layers.Layer):
    """A softmax output that is neither Dense nor Conv (its activation is swapped while it
    runs, to leave it out) and that fails when told to, half-way through a method."""
    fail = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.activation = keras.activations.softmax

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], CLASSES))

    def call(self, inputs):
        if SoftmaxScores.fail:
            raise RuntimeError("failed half-way")
        return self.activation(keras.ops.matmul(inputs, self.kernel))


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_every_method_leaves_the_model_as_it_found_it_when_it_fails_half_way(name):
    seeded(0)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Flatten()(keras.layers.Conv2D(2, 3, padding="same", activation="relu")(inputs))
    model = keras.Model(inputs, SoftmaxScores()(x))
    before = snapshot(model)
    SoftmaxScores.fail = True
    try:
        with pytest.raises((RuntimeError, ValueError)):
            ALL_METHODS[name](model, images())
    finally:
        SoftmaxScores.fail = False
    assert_unchanged(model, before)
    assert model.layers[-1].activation is keras.activations.softmax


def test_a_compiled_graph_is_reused_follows_the_models_weights_and_goes_with_the_model():
    from custom_keras.techniques.attribution.graph import _GRAPHS

    model = small_cnn()
    batch = images()
    first = attribution.grad_cam(model, batch)
    attribution.grad_cam(model, batch[:1])
    assert len(_GRAPHS[model]) == 1
    model.set_weights([w * 1.5 for w in model.get_weights()])
    assert not np.allclose(attribution.grad_cam(model, batch), first)
    assert len(_GRAPHS[model]) == 1
    dropped = weakref.ref(model)
    del model
    gc.collect()
    assert dropped() is None  # its graphs do not keep it alive


@pytest.fixture(scope="module")
def trained_and_reinitialised():
    """A tiny CNN trained on the offline digits, the same network with fresh weights, and
    six digits it was not trained on with their labels."""
    from custom_keras.reference import load_digits_28

    x, y = load_digits_28(1006)
    x = x[:, ::2, ::2]  # 14x14, for speed
    seeded(0)
    inputs = keras.Input((14, 14, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(h))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy")
    model.fit(x[:-6], y[:-6], epochs=8, batch_size=32, verbose=0)
    seeded(7)
    return model, keras.models.clone_model(model), x[-6:], y[-6:]


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=(
        "LRP-z+ maps depend on the input far more than on the weights (rank correlation about 0.7 "
        "here): Sixt, Granz and Landgraf, 'When Explanations Lie', ICML 2020, show that z+ and "
        "alpha-beta maps converge to a weight-independent map"))) if name == "lrp_z_plus" else name
    for name in sorted(ALL_METHODS)])
def test_reinitialising_the_weights_changes_every_methods_map(name, trained_and_reinitialised):
    """Adebayo et al. 2018: a map that survives random weights does not explain the model.

    Ranks of the absolute maps (their metric) over the digit's pixels: off the digit the
    input is 0 = the baseline, which methods that multiply by the input (Integrated
    Gradients, LRP) or occlude with 0 map to 0 by construction, whatever the weights.
    """
    model, reinitialised, x, y = trained_and_reinitialised
    trained_maps = ALL_METHODS[name](model, x, class_index="label", labels=y)
    random_maps = ALL_METHODS[name](reinitialised, x, class_index="label", labels=y)
    on_digit = x[..., 0] > 0
    correlations = [spearmanr(np.abs(a).reshape(a.shape[:2] + (-1,))[digit].reshape(-1),
                              np.abs(b).reshape(b.shape[:2] + (-1,))[digit].reshape(-1))[0]
                    for a, b, digit in zip(trained_maps, random_maps, on_digit)]
    assert np.all(np.isfinite(correlations)) and np.mean(correlations) < 0.5, correlations
