"""Layer activations: names, shapes, exclusions and values against direct sub-model predictions."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from custom_keras.reference import build_reference_model  # noqa: E402
from custom_keras.techniques.activations import ActivationModel, layer_activations  # noqa: E402
from custom_keras.techniques.common import scale_by_max, to_uint8  # noqa: E402


def expected_picture(output):
    """The documented scaling, written out independently of the module."""
    output = np.asarray(output, dtype=np.float64)
    if output.ndim == 3:
        output = np.transpose(output, (2, 0, 1))
    low, high = output.min(), output.max()
    if low < 0:
        return (output - low) * 255.0 / (high - low)
    return output * 255.0 / high


def direct_output(model, layer, images):
    return keras.ops.convert_to_numpy(keras.Model(model.inputs[0], layer.output)(images, training=False))


def assert_matches_direct(model, result, images):
    """Every shown layer equals the scaled prediction of a sub-model ending at that layer."""
    for image_no, layers in enumerate(result):
        for name, picture in layers:
            layer_no = int(name.split(":")[0].split()[1])
            layer = model.layers[layer_no]
            assert name == "Layer %d: %s" % (layer_no, layer.name)
            expected = expected_picture(direct_output(model, layer, images)[image_no])
            assert picture.dtype == np.uint8
            assert picture.shape == expected.shape
            np.testing.assert_allclose(picture, expected, atol=1.0, err_msg=name)


@pytest.fixture(scope="module")
def sequential_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(3, 3, activation="relu", name="conv"),
        keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Dropout(0.5, name="drop"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(5, activation="relu", name="hidden"),
        keras.layers.Dense(3, activation="softmax", name="probabilities"),
    ])


@pytest.fixture(scope="module")
def skip_model():
    """Functional, with a skip connection (Add), a branch merge (Concatenate) and negative outputs."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((6, 6, 2), name="image")
    linear = keras.layers.Conv2D(4, 3, padding="same", name="linear_conv")(inputs)
    relu = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="relu_conv")(linear)
    added = keras.layers.Add(name="skip_add")([linear, relu])
    merged = keras.layers.Concatenate(name="concat")([added, relu])
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(merged)
    logits = keras.layers.Dense(3, name="logits")(pooled)
    return keras.Model(inputs, logits)


def random_images(model, count, seed=0):
    shape = (count,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def test_sequential_names_shapes_values(sequential_model):
    images = random_images(sequential_model, 2)
    result = layer_activations(sequential_model, images)
    assert len(result) == 2
    # Sequential: no InputLayer in model.layers, so the first conv is layer 0.
    assert [(name, picture.shape) for name, picture in result[0]] == [
        ("Layer 0: conv", (3, 6, 6)), ("Layer 1: pool", (3, 3, 3)),
        ("Layer 4: hidden", (5,)), ("Layer 5: probabilities", (3,))]
    assert_matches_direct(sequential_model, result, images)


def test_functional_skip_connection(skip_model):
    images = random_images(skip_model, 3, seed=3)
    result = layer_activations(skip_model, images)
    assert [(name, picture.shape) for name, picture in result[0]] == [
        ("Layer 1: linear_conv", (4, 6, 6)), ("Layer 2: relu_conv", (4, 6, 6)),
        ("Layer 3: skip_add", (4, 6, 6)), ("Layer 4: concat", (8, 6, 6)),
        ("Layer 5: gap", (8,)), ("Layer 6: logits", (3,))]
    assert_matches_direct(skip_model, result, images)
    # The linear layer has negative outputs: its minimum is black, its maximum white.
    linear_picture = result[0][0][1]
    assert linear_picture.min() == 0 and linear_picture.max() == 255
    assert direct_output(skip_model, skip_model.layers[1], images).min() < 0


def test_reference_model_matches_appendix_d():
    model = build_reference_model()
    result = ActivationModel(model)(random_images(model, 1))
    assert [(name, picture.shape) for name, picture in result[0]] == [
        ("Layer 1: %s" % model.layers[1].name, (32, 26, 26)),
        ("Layer 2: %s" % model.layers[2].name, (32, 24, 24)),
        ("Layer 3: %s" % model.layers[3].name, (32, 12, 12)),
        ("Layer 6: %s" % model.layers[6].name, (128,)),
        ("Layer 8: %s" % model.layers[8].name, (64,)),
        ("Layer 9: %s" % model.layers[9].name, (10,))]


def test_exclude_nothing_shows_input_dropout_and_flatten(sequential_model, skip_model):
    images = random_images(skip_model, 1)
    names = [name for name, _ in layer_activations(skip_model, images, exclude_layers=())[0]]
    assert names[0] == "Layer 0: image"
    result = layer_activations(sequential_model, random_images(sequential_model, 1), exclude_layers=())
    pictures = dict(result[0])
    assert list(pictures) == ["Layer 0: conv", "Layer 1: pool", "Layer 2: drop", "Layer 3: flat",
                              "Layer 4: hidden", "Layer 5: probabilities"]
    # Dropout is the identity at inference, so it repeats the pool layer.
    np.testing.assert_array_equal(pictures["Layer 2: drop"], pictures["Layer 1: pool"])
    assert pictures["Layer 3: flat"].shape == (27,)


def test_custom_exclusion(skip_model):
    result = layer_activations(skip_model, random_images(skip_model, 1),
                               exclude_layers=(keras.layers.InputLayer, keras.layers.Conv2D))
    assert [name for name, _ in result[0]] == [
        "Layer 3: skip_add", "Layer 4: concat", "Layer 5: gap", "Layer 6: logits"]


def test_built_once_follows_the_current_weights(sequential_model):
    activation_model = ActivationModel(sequential_model)
    images = random_images(sequential_model, 1, seed=5)
    hidden = sequential_model.get_layer("hidden")
    original = hidden.get_weights()
    before = dict(activation_model(images)[0])["Layer 4: hidden"]
    try:
        hidden.set_weights([np.abs(w) + 0.1 for w in original])
        after = dict(activation_model(images)[0])["Layer 4: hidden"]
        assert_matches_direct(sequential_model, activation_model(images), images)
    finally:
        hidden.set_weights(original)
    assert not np.array_equal(before, after)


def test_sequence_outputs_are_filter_by_time_maps_and_other_ranks_are_skipped_with_a_reason():
    model = keras.Sequential([
        keras.Input((4, 4, 2)),
        keras.layers.Conv2D(2, 3, name="conv"),
        keras.layers.Reshape((4, 2), name="sequence"),
        keras.layers.Reshape((2, 2, 2, 1), name="volume"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(2, name="out"),
    ])
    with pytest.warns(UserWarning, match="volume"):
        activation_model = ActivationModel(model)
    assert activation_model.skipped_layers == [
        ("Layer 2: volume", "its output has 4 dimensions per input; only (units,), (T, C) and "
                            "(H, W, C) are shown")]
    images = random_images(model, 1)
    result = activation_model(images)
    assert [name for name, _ in result[0]] == ["Layer 0: conv", "Layer 1: sequence", "Layer 4: out"]
    sequence = np.asarray(keras.Model(model.inputs, model.layers[1].output)(images))[0]  # (T=4, C=2)
    # One row per filter over time, all filters on one scale (linear conv: from minimum to maximum).
    expected = to_uint8(sequence.T) if sequence.min() < 0 else scale_by_max(sequence.T)
    np.testing.assert_array_equal(result[0][1][1], expected)


def test_constant_layer_is_black(sequential_model):
    # All-zero input and zero conv kernel: the conv output is its (zero) bias everywhere.
    conv = sequential_model.get_layer("conv")
    original = conv.get_weights()
    try:
        conv.set_weights([np.zeros_like(w) for w in original])
        result = layer_activations(sequential_model, np.zeros((1, 8, 8, 1), np.float32))
    finally:
        conv.set_weights(original)
    conv_picture = dict(result[0])["Layer 0: conv"]
    assert conv_picture.shape == (3, 6, 6) and not conv_picture.any()


def test_bad_arguments_get_clear_errors(sequential_model):
    with pytest.raises(ValueError, match="images must have shape"):
        layer_activations(sequential_model, np.zeros((1, 9, 8, 1), np.float32))
    with pytest.raises(ValueError, match="images must have shape"):
        layer_activations(sequential_model, np.zeros((8, 8, 1), np.float32))
    with pytest.raises(TypeError, match="exclude_layers"):
        ActivationModel(sequential_model, exclude_layers=("Dropout",))
    with pytest.raises(TypeError, match="exclude_layers"):
        ActivationModel(sequential_model, exclude_layers=keras.layers.Dropout)
    with pytest.raises(ValueError, match="exclude_layers"):
        ActivationModel(sequential_model, exclude_layers=(keras.layers.Layer,))
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        ActivationModel(unbuilt)


def test_inside_training_follows_each_batch(sequential_model):
    """Built once before fit and called from a callback, it shows the weights of that moment."""
    model = keras.models.clone_model(sequential_model)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="categorical_crossentropy")
    activation_model = ActivationModel(model)
    image = random_images(model, 1, seed=9)
    stages = []
    record = keras.callbacks.LambdaCallback(
        on_batch_end=lambda batch, logs: stages.append(activation_model(image)[0]))
    x = random_images(model, 8, seed=10)
    y = keras.utils.to_categorical(np.arange(8) % 3, 3)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[record])
    assert len(stages) == 2
    assert any(not np.array_equal(first, last) for (_, first), (_, last) in zip(stages[0], stages[1]))
    assert_matches_direct(model, [stages[-1]], image)
