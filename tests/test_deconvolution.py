"""The deconvolutional network against an explicit numpy Zeiler & Fergus reconstruction."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from custom_keras.reference import build_reference_model, load_digits_28  # noqa: E402
from custom_keras.techniques.deconvolution import (  # noqa: E402
    DeconvolutionModel, check_deconvolution_args, deconvolution)


# ---- explicit numpy Zeiler & Fergus (one image (H, W, C), float64) ----

def _padding(size, window, stride, padding):
    """(before, after, output size) as TensorFlow pads 'same' and 'valid'."""
    if padding == "valid":
        return 0, 0, (size - window) // stride + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2, out


def np_conv(x, kernel, bias, stride, padding):
    kh, kw, _, filters = kernel.shape
    top, bottom, out_h = _padding(x.shape[0], kh, stride, padding)
    left, right, out_w = _padding(x.shape[1], kw, stride, padding)
    padded = np.pad(x, ((top, bottom), (left, right), (0, 0)))
    out = np.zeros((out_h, out_w, filters))
    for y in range(out_h):
        for x_ in range(out_w):
            window = padded[y * stride:y * stride + kh, x_ * stride:x_ * stride + kw]
            out[y, x_] = np.tensordot(window, kernel, axes=3) + bias
    return out


def np_conv_transpose(signal, kernel, stride, padding, input_shape):
    """Each output entry spreads its filter, times the entry, back over its input window."""
    kh, kw = kernel.shape[:2]
    top, bottom, _ = _padding(input_shape[0], kh, stride, padding)
    left, right, _ = _padding(input_shape[1], kw, stride, padding)
    padded = np.zeros((input_shape[0] + top + bottom, input_shape[1] + left + right, input_shape[2]))
    for y in range(signal.shape[0]):
        for x_ in range(signal.shape[1]):
            padded[y * stride:y * stride + kh, x_ * stride:x_ * stride + kw] += kernel @ signal[y, x_]
    return padded[top:top + input_shape[0], left:left + input_shape[1]]


def np_max_pool(x, pool, stride, padding):
    """Max pooling and its switches: the (row, col) of each window's first maximum."""
    top, bottom, out_h = _padding(x.shape[0], pool, stride, padding)
    left, right, out_w = _padding(x.shape[1], pool, stride, padding)
    padded = np.pad(x, ((top, bottom), (left, right), (0, 0)), constant_values=-np.inf)
    out = np.zeros((out_h, out_w, x.shape[2]))
    switches = np.zeros((out_h, out_w, x.shape[2], 2), dtype=int)
    for y in range(out_h):
        for x_ in range(out_w):
            for c in range(x.shape[2]):
                window = padded[y * stride:y * stride + pool, x_ * stride:x_ * stride + pool, c]
                wy, wx = np.unravel_index(np.argmax(window), window.shape)
                out[y, x_, c] = window[wy, wx]
                switches[y, x_, c] = (y * stride + wy - top, x_ * stride + wx - left)
    return out, switches


def np_unpool(signal, switches, input_shape):
    out = np.zeros(input_shape)
    for y, x_, c in np.ndindex(signal.shape):
        sy, sx = switches[y, x_, c]
        out[sy, sx, c] += signal[y, x_, c]
    return out


def _relu_in(layer):
    return getattr(layer, "activation", None) is keras.activations.relu


def np_deconvolution(layers, image, map_no):
    """Forward through ``layers`` (the stack up to the chosen layer), keep the max entry of
    ``map_no``, map it back: unpool with switches, ReLU, transposed convolution.

    Returns:
        (reconstruction (H, W, C), max activation of the map)
    """
    inputs, switches = [], {}
    x = image.astype(np.float64)
    for i, layer in enumerate(layers):
        inputs.append(x)
        if isinstance(layer, keras.layers.Conv2D):
            kernel, bias = (np.asarray(w, dtype=np.float64) for w in layer.get_weights())
            x = np_conv(x, kernel, bias, layer.strides[0], layer.padding)
            x = np.maximum(x, 0) if _relu_in(layer) else x
        elif isinstance(layer, keras.layers.MaxPooling2D):
            x, switches[i] = np_max_pool(x, layer.pool_size[0], layer.strides[0], layer.padding)
        elif isinstance(layer, (keras.layers.ReLU, keras.layers.Activation)):
            x = np.maximum(x, 0)
    position = np.unravel_index(np.argmax(x[..., map_no]), x.shape[:2]) + (map_no,)
    signal = np.zeros_like(x)
    signal[position] = x[position]
    for i in reversed(range(len(layers))):
        layer = layers[i]
        if isinstance(layer, keras.layers.Conv2D):
            signal = np.maximum(signal, 0) if _relu_in(layer) else signal
            signal = np_conv_transpose(signal, np.asarray(layer.get_weights()[0], dtype=np.float64),
                                       layer.strides[0], layer.padding, inputs[i].shape)
        elif isinstance(layer, keras.layers.MaxPooling2D):
            signal = np_unpool(signal, switches[i], inputs[i].shape)
        elif isinstance(layer, (keras.layers.ReLU, keras.layers.Activation)):
            signal = np.maximum(signal, 0)
    return signal, x[position]


# ---- small networks with random weights ----

def _randomize(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in weights])


def relu_inside_model(padding, size):
    """Sequential (no InputLayer in model.layers): conv, pool, dropout, strided conv, classifier."""
    model = keras.Sequential([
        keras.Input((size, size, 2)),
        keras.layers.Conv2D(4, 3, padding=padding, activation="relu"),
        keras.layers.MaxPooling2D(2, padding=padding),
        keras.layers.Dropout(0.5),
        keras.layers.Conv2D(5, 3, strides=2, padding=padding, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    _randomize(model, 1)
    return model


def relu_separate_model(padding, size):
    """Functional (layer 0 is the InputLayer) with ReLU and Activation('relu') layers."""
    inputs = keras.Input((size, size, 2))
    x = keras.layers.Conv2D(4, 3, padding=padding)(inputs)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D(2, padding=padding)(x)
    x = keras.layers.Conv2D(5, 3, strides=2, padding=padding)(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    _randomize(model, 2)
    return model


# (builder, padding, input size, chosen layer numbers). Size 13 makes 'same' pooling pad; size 14
# leaves the last row uncovered by the strided 'valid' convolution.
CASES = [
    (relu_inside_model, "same", 13, (3, 1)),
    (relu_inside_model, "valid", 14, (3, 1)),
    (relu_separate_model, "same", 13, (5, 4, 3)),
    (relu_separate_model, "valid", 14, (5, 4, 3)),
]


def _stack(model, layer_no):
    """The layers up to and including ``layer_no``, without the InputLayer."""
    return [l for l in model.layers[:layer_no + 1] if not isinstance(l, keras.layers.InputLayer)]


def _images(size, count=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (count, size, size, 2)).astype(np.float32)


def _close(got, expected):
    return np.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("builder, padding, size, layer_nos", CASES,
                         ids=["relu_inside-same", "relu_inside-valid", "relu_layer-same", "relu_layer-valid"])
def test_equals_numpy_zeiler_fergus_for_every_map(builder, padding, size, layer_nos):
    model = builder(padding, size)
    images = _images(size)
    for layer_no in layer_nos:
        results = deconvolution(model, images, layer_no, feat_map_amount=-1)  # eager
        compiled = DeconvolutionModel(model, layer_no, feat_map_amount=-1)(images)
        assert len(results) == len(compiled) == len(images)
        for image, result, compiled_result in zip(images, results, compiled):
            assert [no for _, _, no in result] == [no for _, _, no in compiled_result]
            assert all(_close(a, b) for (a, _, _), (b, _, _) in zip(result, compiled_result))
            maps = model.layers[layer_no].output.shape[-1]
            assert sorted(no for _, _, no in result) == list(range(maps))
            nonzero = 0
            for reconstruction, name, map_no in result:
                expected, _ = np_deconvolution(_stack(model, layer_no), image, map_no)
                assert name == model.layers[layer_no].name
                assert reconstruction.dtype == np.float32 and reconstruction.shape == image.shape
                assert _close(reconstruction, expected), (layer_no, map_no)
                nonzero += bool(np.any(expected))
            assert nonzero > 0  # the comparison is not all zeros against zeros


def test_top_n_maps_come_in_descending_max_activation_per_image():
    model = relu_inside_model("same", 13)
    images = _images(13, count=3, seed=5)
    results = deconvolution(model, images, 3, feat_map_amount=3)
    for image, result in zip(images, results):
        maxima = [np_deconvolution(_stack(model, 3), image, no)[1] for no in range(5)]
        assert [no for _, _, no in result] == list(np.argsort(maxima)[::-1][:3])
        for reconstruction, _, map_no in result:
            assert _close(reconstruction, np_deconvolution(_stack(model, 3), image, map_no)[0])
    orders = [[no for _, _, no in result] for result in results]
    assert len({tuple(o) for o in orders}) > 1  # the images pick different maps, each its own top N


def test_all_maps_with_minus_one_come_sorted_by_max_activation():
    model = relu_separate_model("valid", 14)
    image = _images(14, count=1)
    result = deconvolution(model, image, 3, feat_map_amount=-1)[0]
    maxima = [np_deconvolution(_stack(model, 3), image[0], no)[1] for no in range(4)]
    assert [no for _, _, no in result] == list(np.argsort(maxima)[::-1])


def test_feat_map_nos_keep_the_given_order():
    model = relu_separate_model("same", 13)
    images = _images(13)
    results = deconvolution(model, images, 5, feat_map_nos=[4, 0, 2])
    for image, result in zip(images, results):
        assert [no for _, _, no in result] == [4, 0, 2]
        for reconstruction, _, map_no in result:
            assert _close(reconstruction, np_deconvolution(_stack(model, 5), image, map_no)[0])


def test_all_pairs_go_through_one_reverse_pass_and_match_single_image_results():
    model = relu_inside_model("same", 13)
    images = _images(13, count=3, seed=9)
    deconv = DeconvolutionModel(model, 3, feat_map_amount=4)
    reverse, batches = deconv._reverse, []

    def recording_reverse(pairs, signal):
        batches.append(tuple(signal.shape))
        return reverse(pairs, signal)

    deconv._reverse = recording_reverse
    tf.config.run_functions_eagerly(True)  # so that every call, not only tracing, is recorded
    try:
        together = deconv(images)
    finally:
        tf.config.run_functions_eagerly(False)
    # The chosen convolution's filters are placed; the backward pass starts at its input.
    assert batches == [(3 * 4, 7, 7, 4)]
    for image, result in zip(images, together):
        alone = deconvolution(model, image[np.newaxis], 3, feat_map_amount=4)[0]
        assert [no for _, _, no in alone] == [no for _, _, no in result]
        for (got, _, _), (expected, _, _) in zip(result, alone):
            assert _close(got, expected)


def test_reads_the_current_weights_at_every_call():
    model = relu_inside_model("same", 13)
    image = _images(13, count=1)
    deconv = DeconvolutionModel(model, 3, feat_map_nos=[1])
    before = deconv(image)[0][0][0]
    _randomize(model, 7)
    after = deconv(image)[0][0][0]
    assert not np.allclose(before, after)
    assert _close(after, np_deconvolution(_stack(model, 3), image[0], 1)[0])


def test_reference_network_pool_layer_eight_maps():
    model = build_reference_model()
    images, _ = load_digits_28(size=2)
    results = deconvolution(model, images, 3, feat_map_amount=8)
    assert len(results) == 2
    for result in results:
        assert len(result) == 8
        assert len({no for _, _, no in result}) == 8
        for reconstruction, name, map_no in result:
            assert reconstruction.shape == (28, 28, 1) and reconstruction.dtype == np.float32
            assert name == model.layers[3].name and 0 <= map_no < 32
        assert any(np.any(reconstruction) for reconstruction, _, _ in result)


# ---- custom_keras_model_info: the thesis' (deconv model, layer map, update) ----

def _two_conv_model():
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(3, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(2, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ])
    _randomize(model, 3)
    return model


def _hand_made_deconv(model):
    """ReLU + Conv2DTranspose with the model's filters, top layer first; layer map {1: 0, 0: 2}."""
    first, second = model.layers[0], model.layers[1]
    deconv = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Activation("relu"),
        keras.layers.Conv2DTranspose(3, 3, padding="valid", use_bias=False),
        keras.layers.Activation("relu"),
        keras.layers.Conv2DTranspose(1, 3, padding="same", use_bias=False),
    ])
    deconv.layers[1].set_weights([second.get_weights()[0]])
    deconv.layers[3].set_weights([first.get_weights()[0]])
    return deconv, {1: 0, 0: 2}


def test_custom_model_info_is_updated_each_call_and_fed_the_processed_maps():
    model = _two_conv_model()
    image = np.random.default_rng(4).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
    calls = []

    def update(current_model):
        calls.append(current_model)
        return _hand_made_deconv(current_model)

    deconv_model, layer_map = _hand_made_deconv(model)
    custom = DeconvolutionModel(model, 1, feat_map_amount=-1,
                                custom_keras_model_info=(deconv_model, layer_map, update))
    for _ in range(2):
        got, expected = custom(image), deconvolution(model, image, 1, feat_map_amount=-1)
        for got_image, expected_image in zip(got, expected):
            assert [no for _, _, no in got_image] == [no for _, _, no in expected_image]
            for (g, _, _), (e, _, _) in zip(got_image, expected_image):
                assert _close(g, e)
        _randomize(model, 8)  # training moves on: update() must pick up the new filters
    assert calls == [model, model]
    assert _close(deconvolution(model, image, 0, feat_map_nos=[2], custom_keras_model_info=(
        *_hand_made_deconv(model), update))[0][0][0], deconvolution(model, image, 0, feat_map_nos=[2])[0][0][0])


def test_custom_model_info_update_returning_none_keeps_the_given_model():
    model = _two_conv_model()
    image = np.ones((1, 8, 8, 1), np.float32)
    info = (*_hand_made_deconv(model), lambda current_model: None)
    got = deconvolution(model, image, 1, feat_map_nos=[0], custom_keras_model_info=info)[0][0][0]
    assert _close(got, deconvolution(model, image, 1, feat_map_nos=[0])[0][0][0])


def test_custom_model_info_lets_unsupported_models_through():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Activation("tanh")(x)
    x = keras.layers.Conv2D(2, 3, activation="relu")(x)
    model = keras.Model(inputs, x)
    deconv_model, _ = _hand_made_deconv(_two_conv_model())
    with pytest.raises(ValueError, match="custom_keras_model_info"):
        check_deconvolution_args(model, 3, feat_map_amount=2)
    info = (deconv_model, {3: 0}, lambda current_model: None)
    check_deconvolution_args(model, 3, feat_map_amount=2, custom_keras_model_info=info)
    result = deconvolution(model, np.ones((1, 8, 8, 1), np.float32), 3, feat_map_amount=2,
                           custom_keras_model_info=info)[0]
    assert [r[0].shape for r in result] == [(8, 8, 1), (8, 8, 1)]


# ---- bad arguments ----

def _branch_below_model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3, activation="relu")(inputs)
    a = keras.layers.Conv2D(2, 3, padding="same")(x)
    b = keras.layers.Conv2D(2, 1)(x)
    merged = keras.layers.Add()([a, b])
    return keras.Model(inputs, keras.layers.Conv2D(2, 3)(merged))


def _model_with(layer):
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, activation="relu"),
                             layer, keras.layers.Conv2D(2, 3, activation="relu")])


@pytest.fixture(scope="module")
def reference_model():
    return build_reference_model()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(feat_map_layer_no=10, feat_map_amount=1), ValueError, "feat_map_layer_no=10 is out of range"),
    (dict(feat_map_layer_no="3", feat_map_amount=1), TypeError, "feat_map_layer_no"),
    (dict(feat_map_layer_no=6, feat_map_amount=1), ValueError, r"feat_map_layer_no=6 is layer 6 \(dense.*no feature maps"),
    (dict(feat_map_layer_no=5, feat_map_amount=1), ValueError, "feat_map_layer_no=5 .*Flatten.*no feature maps"),
    (dict(feat_map_layer_no=0, feat_map_amount=1), ValueError, "feat_map_layer_no=0 .*InputLayer"),
    (dict(feat_map_layer_no=3), ValueError, "exactly one of feat_map_amount .* and feat_map_nos"),
    (dict(feat_map_layer_no=3, feat_map_amount=2, feat_map_nos=[1]), ValueError, "exactly one of feat_map_amount"),
    (dict(feat_map_layer_no=3, feat_map_amount=0), ValueError, "feat_map_amount=0 is out of range"),
    (dict(feat_map_layer_no=3, feat_map_amount=33), ValueError, "feat_map_amount=33 is out of range"),
    (dict(feat_map_layer_no=3, feat_map_amount=-2), ValueError, "feat_map_amount=-2"),
    (dict(feat_map_layer_no=3, feat_map_amount=2.0), TypeError, "feat_map_amount must be an int"),
    (dict(feat_map_layer_no=3, feat_map_nos=[0, 32]), ValueError, "feat_map_nos: map number 32 is out of range.*0..31"),
    (dict(feat_map_layer_no=3, feat_map_nos=[-1]), ValueError, "feat_map_nos: map number -1 is out of range"),
    (dict(feat_map_layer_no=3, feat_map_nos=3), TypeError, "feat_map_nos must be a non-empty list"),
    (dict(feat_map_layer_no=3, feat_map_nos=[]), TypeError, "feat_map_nos must be a non-empty list"),
    (dict(feat_map_layer_no=3, feat_map_nos=[1, 1]), ValueError, "feat_map_nos has repeated"),
    (dict(feat_map_layer_no=3, feat_map_amount=1, custom_keras_model_info=("model", {})), TypeError,
     "custom_keras_model_info must be a tuple"),
    (dict(feat_map_layer_no=3, feat_map_amount=1, custom_keras_model_info=("model", {3: 0}, None)), TypeError,
     r"custom_keras_model_info\[2\] \(update\) must be callable"),
    (dict(feat_map_layer_no=3, feat_map_amount=1, custom_keras_model_info=("model", {3: 0}, print)), TypeError,
     "custom_keras_model_info: the deconvolutional model must be a keras.Model"),
])
def test_bad_arguments_raise_errors_naming_the_argument(reference_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_deconvolution_args(reference_model, **kwargs)
    with pytest.raises(error, match=match):
        DeconvolutionModel(reference_model, **kwargs)


def test_custom_layer_map_must_cover_the_chosen_layer(reference_model):
    deconv_model, layer_map = _hand_made_deconv(_two_conv_model())
    with pytest.raises(ValueError, match="custom_keras_model_info: the layer map has no entry for feat_map_layer_no=3"):
        check_deconvolution_args(reference_model, 3, 1, custom_keras_model_info=(deconv_model, layer_map, print))
    with pytest.raises(ValueError, match=r"custom_keras_model_info: layer_map\[3\]=9 is not a layer number"):
        check_deconvolution_args(reference_model, 3, 1, custom_keras_model_info=(deconv_model, {3: 9}, print))


class Doubling(keras.layers.Layer):
    """A custom layer: the deconvolutional network cannot know its reverse."""

    def call(self, inputs):
        return inputs * 2.0


@pytest.mark.parametrize("model, layer_no, culprit", [
    (_model_with(keras.layers.Activation("tanh")), 2, "Activation.*tanh"),
    (_model_with(keras.layers.Conv2D(2, 3, padding="same", activation="sigmoid")), 2, "Conv2D.*sigmoid"),
    (_model_with(keras.layers.LeakyReLU()), 2, "LeakyReLU"),
    (_model_with(Doubling()), 2, "Doubling"),
], ids=["tanh", "sigmoid_conv", "leaky_relu", "custom_layer"])
def test_layers_without_a_deconvnet_reverse_are_named_and_ask_for_custom_model_info(model, layer_no, culprit):
    with pytest.raises(ValueError, match="feat_map_layer_no.*%s.*custom_keras_model_info" % culprit):
        check_deconvolution_args(model, layer_no, feat_map_amount=1)


# ---- the layers of real networks, against an explicit numpy reverse pass ----

def np_batch_norm(layer, x):
    gamma, beta, mean, variance = (np.asarray(w, dtype=np.float64) for w in layer.get_weights())
    return (x - mean) / np.sqrt(variance + layer.epsilon) * gamma + beta


def np_batch_norm_transpose(layer, signal):
    gamma, _, _, variance = (np.asarray(w, dtype=np.float64) for w in layer.get_weights())
    return signal * gamma / np.sqrt(variance + layer.epsilon)


def np_average_pool(x):
    h, w, c = x.shape
    return x[:h // 2 * 2, :w // 2 * 2].reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))


def np_average_pool_transpose(signal, input_shape):
    out = np.zeros(input_shape)
    out[:signal.shape[0] * 2, :signal.shape[1] * 2] = np.repeat(np.repeat(signal, 2, 0), 2, 1) / 4
    return out


def residual_model():
    """conv relu -> BN -> [zero-pad -> conv] + BN -> relu -> concat(avg pool, max pool) -> strided conv."""
    inputs = keras.Input((8, 8, 2))
    x1 = keras.layers.Conv2D(3, 3, padding="same", activation="relu")(inputs)
    x2 = keras.layers.BatchNormalization()(x1)
    x3 = keras.layers.ZeroPadding2D(1)(x2)
    x4 = keras.layers.Conv2D(3, 3)(x3)
    x5 = keras.layers.Add()([x4, x2])
    x6 = keras.layers.Activation("relu")(x5)
    x7 = keras.layers.Concatenate()([keras.layers.AveragePooling2D(2)(x6),
                                     keras.layers.MaxPooling2D(2)(keras.layers.Dropout(0.5)(x6))])
    x8 = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(x7)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x8))
    model = keras.Model(inputs, outputs)
    _randomize(model, 4)
    bn = next(l for l in model.layers if isinstance(l, keras.layers.BatchNormalization))
    rng = np.random.default_rng(5)  # moving variance must be positive
    bn.set_weights([rng.normal(1, 0.5, 3), rng.normal(0, 0.5, 3), rng.normal(0, 0.5, 3),
                    rng.uniform(0.5, 2, 3)])
    return model


def np_residual_deconvolution(model, image, map_no):
    """The numpy forward and reverse pass of ``residual_model``, layer by layer."""
    by_type = {}
    for layer in model.layers:
        by_type.setdefault(type(layer).__name__, []).append(layer)
    conv1, conv2, conv3 = by_type["Conv2D"]
    bn = by_type["BatchNormalization"][0]

    def weights(layer):
        return [np.asarray(w, dtype=np.float64) for w in layer.get_weights()]

    x0 = image.astype(np.float64)
    x1 = np.maximum(np_conv(x0, *weights(conv1), 1, "same"), 0)
    x2 = np_batch_norm(bn, x1)
    x3 = np.pad(x2, ((1, 1), (1, 1), (0, 0)))
    x4 = np_conv(x3, *weights(conv2), 1, "valid")
    x6 = np.maximum(x4 + x2, 0)
    pooled, switches = np_max_pool(x6, 2, 2, "valid")
    x7 = np.concatenate([np_average_pool(x6), pooled], axis=-1)
    x8 = np.maximum(np_conv(x7, *weights(conv3), 2, "same"), 0)

    position = np.unravel_index(np.argmax(x8[..., map_no]), x8.shape[:2]) + (map_no,)
    signal = np.zeros_like(x8)
    signal[position] = x8[position]
    s7 = np_conv_transpose(np.maximum(signal, 0), weights(conv3)[0], 2, "same", x7.shape)
    s6 = np_average_pool_transpose(s7[..., :3], x6.shape) + np_unpool(s7[..., 3:], switches, x6.shape)
    s5 = np.maximum(s6, 0)
    s3 = np_conv_transpose(s5, weights(conv2)[0], 1, "valid", x3.shape)
    s2 = s5 + s3[1:-1, 1:-1]
    s1 = np_batch_norm_transpose(bn, s2)
    return np_conv_transpose(np.maximum(s1, 0), weights(conv1)[0], 1, "same", x0.shape)


def test_residual_network_with_batch_norm_padding_and_branches_equals_numpy():
    model = residual_model()
    layer_no = next(i for i, l in enumerate(model.layers)
                    if isinstance(l, keras.layers.Conv2D) and l.strides == (2, 2))
    images = _images(8)
    for image, result in zip(images, DeconvolutionModel(model, layer_no, feat_map_amount=-1)(images)):
        nonzero = 0
        for reconstruction, _, map_no in result:
            expected = np_residual_deconvolution(model, image, map_no)
            assert _close(reconstruction, expected), map_no
            nonzero += bool(np.any(expected))
        assert nonzero > 0


def test_a_base_model_used_as_a_layer_is_reversed_through_its_own_layers():
    base = keras.Sequential([keras.Input((13, 13, 2)),
                             keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                             keras.layers.MaxPooling2D(2, padding="same")], name="base")
    inputs = keras.Input((13, 13, 2))
    x = keras.layers.Conv2D(5, 3, strides=2, activation="relu")(base(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    _randomize(model, 7)
    _randomize(base, 8)
    images = _images(13)
    for image, result in zip(images, deconvolution(model, images, 2, feat_map_amount=-1)):
        for reconstruction, _, map_no in result:
            expected, _ = np_deconvolution(base.layers + [model.layers[2]], image, map_no)
            assert _close(reconstruction, expected)


def test_conv1d_sequences_are_reversed_as_one_row_images():
    """Conv1D / MaxPooling1D equal Conv2D / MaxPooling2D over a (1, T, C) image (numpy-checked above)."""
    sequence = keras.Sequential([keras.Input((20, 2)),
                                 keras.layers.Conv1D(4, 3, activation="relu"),
                                 keras.layers.MaxPooling1D(2),
                                 keras.layers.Conv1D(3, 3, strides=2, padding="same", activation="relu")])
    image = keras.Sequential([keras.Input((1, 20, 2)),
                              keras.layers.Conv2D(4, (1, 3), activation="relu"),
                              keras.layers.MaxPooling2D((1, 2)),
                              keras.layers.Conv2D(3, (1, 3), strides=(1, 2), padding="same", activation="relu")])
    _randomize(sequence, 9)
    for conv1d, conv2d in zip(sequence.layers[::2], image.layers[::2]):
        kernel, bias = conv1d.get_weights()
        conv2d.set_weights([kernel[np.newaxis], bias])
    inputs = np.random.default_rng(3).uniform(-1, 1, (2, 20, 2)).astype(np.float32)
    got = deconvolution(sequence, inputs, 2, feat_map_amount=-1)
    expected = deconvolution(image, inputs[:, np.newaxis], 2, feat_map_amount=-1)
    for got_result, expected_result in zip(got, expected):
        assert [no for _, _, no in got_result] == [no for _, _, no in expected_result]
        for (reconstruction, _, _), (reference, _, _) in zip(got_result, expected_result):
            assert reconstruction.shape == (20, 2)
            assert _close(reconstruction, reference[0])


def test_layers_off_the_path_to_the_chosen_layer_do_not_matter():
    model = _branch_below_model()  # conv -> two branches -> Add -> conv
    check_deconvolution_args(model, 2, feat_map_amount=-1)  # one branch: input -> conv -> conv
    result = deconvolution(model, np.ones((1, 8, 8, 1), np.float32), 2, feat_map_amount=-1)[0]
    assert [r[0].shape for r in result] == [(8, 8, 1), (8, 8, 1)]


def test_fully_convolutional_model_takes_any_image_size():
    model = keras.Sequential([
        keras.Input((None, None, 2)),
        keras.layers.Conv2D(3, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(2, 3, strides=2, activation="relu"),
    ])
    _randomize(model, 6)
    deconv = DeconvolutionModel(model, 2, feat_map_nos=[1, 0])
    for size in (11, 16):
        image = _images(size, count=1, seed=size)
        for reconstruction, _, map_no in deconv(image)[0]:
            assert reconstruction.shape == (size, size, 2)
            assert _close(reconstruction, np_deconvolution(model.layers, image[0], map_no)[0])


def test_custom_update_must_return_a_pair_or_none():
    model = _two_conv_model()
    info = (*_hand_made_deconv(model), lambda current_model: "new model")
    with pytest.raises(TypeError, match=r"custom_keras_model_info: update\(model\) must return"):
        deconvolution(model, np.ones((1, 8, 8, 1), np.float32), 1, feat_map_amount=1,
                      custom_keras_model_info=info)


def test_works_inside_model_fit():
    model = relu_inside_model("same", 13)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    image = _images(13, count=1)
    deconv = DeconvolutionModel(model, 3, feat_map_amount=2)
    seen = []
    callback = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(deconv(image)))
    x = _images(13, count=8, seed=3)
    y = keras.utils.to_categorical(np.arange(8) % 3, 3)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[callback])
    assert len(seen) == 2
    for reconstruction, _, map_no in seen[-1][0]:
        assert _close(reconstruction, np_deconvolution(_stack(model, 3), image[0], map_no)[0])
