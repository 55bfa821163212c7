"""Saliency maps against central finite differences of the pre-softmax score on tiny models."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from custom_keras.reference import build_reference_model  # noqa: E402
from custom_keras.techniques.saliency import SaliencyModel, saliency_maps  # noqa: E402

INPUT_SHAPE = (5, 5, 2)  # two channels, so the maximum over channels matters
CLASSES = 4
STEP = 1e-2


def softmax_in_dense():
    inputs = keras.Input(INPUT_SHAPE)
    x = keras.layers.Conv2D(3, 3, activation="tanh")(inputs)  # smooth, for finite differences
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="scores")(x)
    return keras.Model(inputs, outputs)


def softmax_layer_sequential():
    return keras.Sequential([
        keras.Input(INPUT_SHAPE),
        keras.layers.Conv2D(3, 3, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(CLASSES, name="scores"),
        keras.layers.Softmax(),
    ])


def softmax_activation_layer():
    inputs = keras.Input(INPUT_SHAPE)
    x = keras.layers.Conv2D(3, 3, activation="tanh")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(CLASSES, name="scores")(x)
    return keras.Model(inputs, keras.layers.Activation("softmax")(x))


def logits(model, images):
    """Pre-softmax scores computed independently of the module under test."""
    layer = model.get_layer("scores")
    if layer.activation is keras.activations.linear:
        return keras.ops.convert_to_numpy(keras.Model(model.inputs[0], layer.output)(images)).astype(np.float64)
    kernel, bias = layer.get_weights()
    features = keras.ops.convert_to_numpy(keras.Model(model.inputs[0], layer.input)(images))
    return features.astype(np.float64) @ kernel + bias


def probabilities(model, images):
    return keras.ops.convert_to_numpy(model(images)).astype(np.float64)


def finite_difference(function, image, class_no):
    """Central difference of function(images)[:, class_no] w.r.t. every input value of one image."""
    steps = np.eye(image.size, dtype=np.float32).reshape((image.size,) + image.shape) * STEP
    plus = function(image + steps)[:, class_no]
    minus = function(image - steps)[:, class_no]
    return ((plus - minus) / (2 * STEP)).reshape(image.shape)


def correlation(a, b):
    return np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1]


def expected_map(gradient, part):
    """The documented picture, written out independently: part of the gradient, max over channels."""
    saliency = part(gradient).max(axis=-1, keepdims=True)
    return saliency * 255.0 / saliency.max()


def make_images(count, seed):
    return np.random.default_rng(seed).uniform(0, 1, (count,) + INPUT_SHAPE).astype(np.float32)


@pytest.fixture(scope="module", params=[softmax_in_dense, softmax_layer_sequential, softmax_activation_layer])
def case(request):
    """A model, two images, and the finite-difference gradients of each image's predicted class."""
    keras.utils.set_random_seed(7)
    model = request.param()
    images = make_images(2, seed=8)
    predicted = probabilities(model, images).argmax(axis=-1)
    logit_gradients = np.stack([
        finite_difference(lambda x: logits(model, x), image, class_no)
        for image, class_no in zip(images, predicted)])
    probability_gradients = np.stack([
        finite_difference(lambda x: probabilities(model, x), image, class_no)
        for image, class_no in zip(images, predicted)])
    return model, images, logit_gradients, probability_gradients


def test_gradient_is_the_pre_softmax_finite_difference(case):
    model, images, logit_gradients, probability_gradients = case
    gradients, _ = SaliencyModel(model).gradients(images)
    assert gradients.shape == images.shape
    for gradient, logit_gradient, probability_gradient in zip(gradients, logit_gradients, probability_gradients):
        scale = np.abs(logit_gradient).max()
        assert correlation(gradient, logit_gradient) >= 0.99
        np.testing.assert_allclose(gradient, logit_gradient, atol=0.02 * scale)
        # The probability's gradient is a different thing: the module must not use it.
        assert np.abs(gradient - probability_gradient).max() > 0.1 * scale


@pytest.mark.parametrize("mode, part", [
    ("absolute", np.abs),
    ("positive", lambda g: np.maximum(g, 0)),
    ("negative", lambda g: np.maximum(-g, 0)),
])
def test_maps_match_finite_differences(case, mode, part):
    model, images, logit_gradients, _ = case
    maps, _, _ = saliency_maps(model, images, mode=mode)
    assert maps.shape == images.shape[:3] + (1,) and maps.dtype == np.uint8
    for saliency_map, logit_gradient in zip(maps, logit_gradients):
        expected = expected_map(logit_gradient, part)
        assert saliency_map.max() == 255
        assert correlation(saliency_map, expected) >= 0.99


def test_positive_and_negative_split_the_gradient(case):
    model, images, _, _ = case
    gradients, _ = SaliencyModel(model).gradients(images)
    positive, _, _ = saliency_maps(model, images, mode="positive")
    negative, _, _ = saliency_maps(model, images, mode="negative")
    all_negative = (gradients < 0).all(axis=-1, keepdims=True)
    all_positive = (gradients > 0).all(axis=-1, keepdims=True)
    assert all_negative.any() and all_positive.any()
    assert not positive[all_negative].any() and positive[all_positive].any()
    assert not negative[all_positive].any() and negative[all_negative].any()


def test_predicted_classes_and_confidences(case):
    model, images, _, _ = case
    _, predicted, confidences = saliency_maps(model, images)
    expected = probabilities(model, images)
    assert predicted.dtype == np.int64 and predicted.shape == (2,)
    assert confidences.dtype == np.float32 and confidences.shape == (2,)
    np.testing.assert_array_equal(predicted, expected.argmax(axis=-1))
    np.testing.assert_allclose(confidences, expected.max(axis=-1), rtol=1e-5)


def test_logits_model_confidence_is_softmax_of_scores():
    keras.utils.set_random_seed(3)
    inputs = keras.Input(INPUT_SHAPE)
    outputs = keras.layers.Dense(CLASSES)(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs)
    images = make_images(3, seed=4)
    scores = keras.ops.convert_to_numpy(model(images)).astype(np.float64)
    maps, predicted, confidences = saliency_maps(model, images)
    probabilities_ = np.exp(scores) / np.exp(scores).sum(axis=-1, keepdims=True)
    np.testing.assert_array_equal(predicted, scores.argmax(axis=-1))
    np.testing.assert_allclose(confidences, probabilities_.max(axis=-1), rtol=1e-5)
    # A linear model's gradient is the predicted class's kernel column.
    kernel = model.layers[-1].get_weights()[0]
    for saliency_map, class_no in zip(maps, predicted):
        expected = expected_map(kernel[:, class_no].reshape(INPUT_SHAPE), np.abs)
        np.testing.assert_allclose(saliency_map, expected, atol=1.0)


def test_reference_model_one_map_per_image():
    model = build_reference_model()
    images = np.random.default_rng(1).uniform(0, 1, (3, 28, 28, 1)).astype(np.float32)
    maps, predicted, confidences = SaliencyModel(model)(images)
    assert maps.shape == (3, 28, 28, 1) and maps.dtype == np.uint8
    assert (maps.reshape(3, -1).max(axis=1) == 255).all()
    assert ((0 <= predicted) & (predicted < 10)).all()
    assert ((0.1 <= confidences) & (confidences <= 1)).all()


def test_bad_arguments_get_clear_errors():
    model = softmax_in_dense()
    with pytest.raises(ValueError, match="mode must be one of absolute, positive, negative"):
        saliency_maps(model, make_images(1, 0), mode="abs")
    with pytest.raises(ValueError, match="images must have shape"):
        saliency_maps(model, np.zeros((1, 5, 5, 3), np.float32))
    inputs = keras.Input(INPUT_SHAPE)
    with pytest.raises(ValueError, match="one output"):
        SaliencyModel(keras.Model(inputs, [keras.layers.Flatten()(inputs), keras.layers.Flatten()(inputs)]))
    with pytest.raises(ValueError, match="one score per class"):
        SaliencyModel(keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs)))
    with pytest.raises(ValueError, match="not built"):
        SaliencyModel(keras.Sequential([keras.layers.Dense(2)]))


def test_inside_training_keeps_the_softmax():
    """Called from a callback during fit, the maps follow training and the model keeps its softmax."""
    keras.utils.set_random_seed(5)
    model = softmax_in_dense()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="categorical_crossentropy")
    saliency_model = SaliencyModel(model)
    image = make_images(1, seed=6)
    maps = []
    record = keras.callbacks.LambdaCallback(
        on_batch_end=lambda batch, logs: maps.append(saliency_model(image)[0]))
    x = make_images(8, seed=7)
    y = keras.utils.to_categorical(np.arange(8) % CLASSES, CLASSES)
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[record])
    assert len(maps) == 4 and not np.array_equal(maps[0], maps[-1])
    np.testing.assert_array_equal(maps[-1], saliency_maps(model, image)[0])
    np.testing.assert_allclose(probabilities(model, x).sum(axis=-1), 1.0, rtol=1e-5)
    assert np.isfinite(history.history["loss"]).all()
