"""Any model, any failure: every registered technique gives checked results or a clear reason.

Fifteen architectures that real users train, tiny, on tiny generated data, for
2 epochs of 2 batches with every technique registered. For each: training
finishes every epoch, and every technique is either active with results that
pass its checks or switched off with the reason we expect in techniques.json.
"""
import json
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from custom_keras import registry, storage  # noqa: E402
from custom_keras.callbacks import CustomCallbacks  # noqa: E402
from custom_keras.techniques.common import LayerScore  # noqa: E402
from custom_keras.techniques.saliency import SaliencyModel  # noqa: E402

L = keras.layers
VISUALIZING = ("layer_activations", "saliency_maps", "deconvolutional_network", "deep_visualization")


@pytest.fixture(autouse=True)
def _fresh_session(monkeypatch):
    monkeypatch.delenv(storage.RUN_DIR_ENV, raising=False)
    keras.backend.clear_session()


class Doubling(L.Layer):
    """A user's own layer."""

    def call(self, inputs):
        return inputs * 2.0


def classifier(inputs, x, classes=3):
    return keras.Model(inputs, L.Dense(classes, activation="softmax")(x))


def reference_cnn():
    from custom_keras.reference import build_reference_model
    return build_reference_model(3), 3


def sequential_without_input():
    return keras.Sequential([L.Conv2D(4, 3, activation="relu"), L.MaxPooling2D(),
                             L.Flatten(), L.Dense(3, activation="softmax")]), 0


def rgb_residual_batch_norm():
    inputs = keras.Input((12, 12, 3))
    x = L.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    shortcut = L.Activation("relu")(x)
    x = L.Conv2D(4, 3, padding="same", activation="relu")(shortcut)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(L.Add()([x, shortcut]))
    return classifier(inputs, L.GlobalAveragePooling2D()(L.MaxPooling2D()(x))), 7


def depthwise_separable():
    inputs = keras.Input((10, 10, 3))
    x = L.SeparableConv2D(4, 3, activation="relu")(inputs)
    x = L.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    return classifier(inputs, L.Flatten()(x)), 2


def densely_connected_block():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(3, 3, padding="same", activation="relu")(inputs)
    y = L.Conv2D(3, 3, padding="same", activation="relu")(x)
    x = L.Concatenate()([x, y])
    y = L.Conv2D(3, 3, padding="same", activation="relu")(x)
    x = L.Concatenate()([x, y])
    x = L.AveragePooling2D(2)(L.Conv2D(4, 1, activation="relu")(x))
    return classifier(inputs, L.Flatten()(x)), 6


def nested_base_model():
    base = keras.Sequential([keras.Input((10, 10, 3)), L.ZeroPadding2D(1),
                             L.Conv2D(4, 3, activation="relu"), L.MaxPooling2D()], name="base")
    inputs = keras.Input((10, 10, 3))
    x = L.Conv2D(4, 3, padding="same", activation="relu")(base(inputs))
    return classifier(inputs, L.Dropout(0.2)(L.Flatten()(x))), 2


def strided_without_pooling():
    inputs = keras.Input((12, 12, 1))
    x = L.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inputs)
    x = L.Conv2D(4, 3, strides=2, activation="relu")(x)
    return classifier(inputs, L.Flatten()(x)), 2


def global_average_pooling():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(5, 3, activation="relu")(inputs)
    return classifier(inputs, L.GlobalAveragePooling2D()(x)), 1


def conv1d_sequences():
    inputs = keras.Input((16, 2))
    x = L.Conv1D(4, 3, activation="relu")(inputs)
    x = L.MaxPooling1D()(x)
    x = L.Conv1D(4, 3, padding="same", activation="relu")(x)
    return classifier(inputs, L.GlobalAveragePooling1D()(x)), 3


def recurrent_sequences():
    inputs = keras.Input((10, 2))
    x = L.LSTM(4, return_sequences=True)(inputs)
    return classifier(inputs, L.GRU(3)(x)), 1


def dense_tabular():
    inputs = keras.Input((6,))
    return classifier(inputs, L.Dense(8, activation="relu")(inputs)), 1


def sigmoid_binary():
    inputs = keras.Input((8, 8, 1))
    x = L.Flatten()(L.MaxPooling2D()(L.Conv2D(3, 3, activation="relu")(inputs)))
    return keras.Model(inputs, L.Dense(1, activation="sigmoid")(x)), 1


def regression():
    inputs = keras.Input((5,))
    return keras.Model(inputs, L.Dense(1)(L.Dense(6, activation="tanh")(inputs))), 1


def multi_output():
    inputs = keras.Input((8, 8, 1))
    x = L.Flatten()(L.Conv2D(3, 3, activation="relu")(inputs))
    return keras.Model(inputs, [L.Dense(3, activation="softmax", name="label")(x),
                                L.Dense(1, name="size")(x)]), 1


def custom_layer():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(3, 3, activation="relu")(inputs)
    x = L.Conv2D(3, 3, activation="relu")(Doubling()(x))
    return classifier(inputs, L.Flatten()(x)), 3


# name: (builder, loss, what the techniques that cannot serve the model say)
ARCHITECTURES = {
    "reference_cnn": (reference_cnn, "categorical_crossentropy", {}),
    "sequential_without_input": (sequential_without_input, "categorical_crossentropy", {}),
    "rgb_residual_batch_norm": (rgb_residual_batch_norm, "categorical_crossentropy", {}),
    "depthwise_separable": (depthwise_separable, "categorical_crossentropy", {}),
    "densely_connected_block": (densely_connected_block, "categorical_crossentropy", {}),
    "nested_base_model": (nested_base_model, "categorical_crossentropy", {}),
    "strided_without_pooling": (strided_without_pooling, "categorical_crossentropy", {}),
    "global_average_pooling": (global_average_pooling, "categorical_crossentropy", {}),
    "conv1d_sequences": (conv1d_sequences, "categorical_crossentropy", {}),
    "recurrent_sequences": (recurrent_sequences, "categorical_crossentropy", {
        "deconvolutional_network": r"layer 1 \(lstm, LSTM\) is below or at the chosen layer.*"
                                   "custom_keras_model_info"}),
    "dense_tabular": (dense_tabular, "categorical_crossentropy", {
        "deconvolutional_network": r"needs feature maps: a model with a feature-vector input \(6,\)"}),
    "sigmoid_binary": (sigmoid_binary, "binary_crossentropy", {}),
    "regression": (regression, "mse", {
        "deconvolutional_network": r"needs feature maps"}),
    "multi_output": (multi_output, ["categorical_crossentropy", "mse"], {
        "saliency_maps": "saliency maps need a model with one output, this one has 2"}),
    "custom_layer": (custom_layer, "categorical_crossentropy", {
        "deconvolutional_network": r"layer 2 \(doubling, Doubling\) is below or at the chosen "
                                   "layer.*no reverse for a Doubling layer"}),
}


def targets(model, loss, samples, rng):
    outputs = []
    for output, one_loss in zip(model.outputs, loss if isinstance(loss, list) else [loss]):
        units = output.shape[-1]
        if one_loss == "categorical_crossentropy":
            outputs.append(keras.utils.to_categorical(rng.integers(0, units, samples), units))
        elif one_loss == "binary_crossentropy":
            outputs.append(rng.integers(0, 2, (samples, units)).astype(np.float32))
        else:
            outputs.append(rng.normal(size=(samples, units)).astype(np.float32))
    return outputs if len(outputs) > 1 else outputs[0]


def write_image(run_dir, shape):
    height, width, channels = shape
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, channels), dtype=np.uint8)
    os.makedirs(storage.images_dir(run_dir), exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(
        os.path.join(storage.images_dir(run_dir), "digit.png"))


def last_dense_layer_no(model):
    return max(i for i, layer in enumerate(model.layers) if isinstance(layer, L.Dense))


def check_result(key, result, input_shape, kind):
    """The technique's own checks for one input's latest result."""
    if key == "layer_activations":
        assert result and all(array.dtype == np.uint8 and array.ndim in (1, 2, 3)
                              for _, array in result)
    elif key == "saliency_maps" and kind == "image":
        assert result.dtype == np.uint8 and result.shape == input_shape[:2] + (1,)
    elif key == "saliency_maps":
        assert result["gradient"].shape == result["input"].shape == input_shape
        np.testing.assert_allclose(result["gradient_x_input"], result["gradient"] * result["input"])
        assert np.all(np.isfinite(result["gradient"]))
    elif key == "deconvolutional_network":
        for reconstruction, _, _ in result:
            assert reconstruction.shape == input_shape
            assert reconstruction.dtype == (np.uint8 if kind == "image" else np.float32)
        assert any(np.any(reconstruction) for reconstruction, _, _ in result)
    elif key == "deep_visualization":
        for synthetic, _, _, value in result:
            assert synthetic.shape == input_shape and np.isfinite(value)
            assert synthetic.dtype == (np.uint8 if kind == "image" else np.float32)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_technique_gives_checked_results_or_a_clear_reason(tmp_path, name):
    builder, loss, reasons = ARCHITECTURES[name]
    run_dir = str(tmp_path)
    model, deconvolution_layer_no = builder()
    rng = np.random.default_rng(0)
    input_shape = (8, 8, 1) if name == "sequential_without_input" else tuple(model.inputs[0].shape[1:])
    kind = {3: "image", 2: "sequence", 1: "tabular"}[len(input_shape)]
    x = rng.uniform(0, 1, (16,) + input_shape).astype(np.float32)
    if name == "sequential_without_input":  # no outputs before its first batch
        y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
    else:
        y = targets(model, loss, 16, rng)
    model.compile(optimizer="adam", loss=loss)
    if kind == "image":
        write_image(run_dir, input_shape)
        callbacks = CustomCallbacks(run_dir, base_interval=2)
    else:
        callbacks = CustomCallbacks(run_dir, base_interval=2, visualization_inputs=x[:2])
    callbacks.register_network_saver()
    callbacks.register_training_progress()
    callbacks.register_layer_activations()
    callbacks.register_saliency_maps()
    callbacks.register_deconvolutional_network(deconvolution_layer_no, feat_map_amount=2)
    deep_layer = 3 if name == "sequential_without_input" else last_dense_layer_no(model)
    callbacks.register_deep_visualization([(deep_layer, 0)], learning_rate=1, no_of_iterations=3,
                                          l2_decay=0.01, blur_interval=2, blur_std=0.5)

    fit = model.fit(x, y, batch_size=8, epochs=2, callbacks=callbacks.get_list(), verbose=0)

    assert len(fit.history["loss"]) == 2
    with open(storage.results_path(run_dir, storage.TECHNIQUES_FILE)) as f:
        record = json.load(f)
    assert set(record) == set(VISUALIZING) | {"network_saver", "training_progress",
                                              "health_checks"}
    # the health checks run on every model; without gradients where they cannot have them
    health_checks = record["health_checks"]
    assert health_checks["state"] == "active", health_checks
    if name not in ("sequential_without_input", "multi_output"):
        assert health_checks["reason"] is None, health_checks
        assert os.path.getsize(storage.results_path(run_dir, storage.GRADIENT_NORMS_TABLE))
    else:
        assert health_checks["reason"].startswith("without gradient norms"), health_checks
    for key in VISUALIZING:
        entry = record[key]
        if key in reasons:
            assert entry["state"] == "switched_off", (key, entry)
            assert re.search(reasons[key], entry["reason"]), entry["reason"]
            continue
        assert entry["state"] == "active", (key, entry)
        assert entry["input_kind"] == kind
        results_file = registry.get(key).results_file
        steps = [e["step"] for e in storage.read_history_index(run_dir, results_file)[0]]
        first = entry["first_snapshot_step"]
        assert steps == [first] + [s for s in (2, 4) if s > first], key
        names = (["digit.png"] if kind == "image" else ["input_0", "input_1"])
        for image_name in names:
            check_result(key, storage.read_latest(run_dir, results_file, image_name),
                         input_shape, kind)
    assert os.listdir(storage.networks_dir(run_dir))


def test_tabular_saliency_is_the_gradient_of_the_pre_softmax_score():
    inputs = keras.Input((6,))  # smooth, so that central differences are exact to O(step^2)
    model = classifier(inputs, L.Dense(8, activation="tanh")(inputs))
    rows = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    gradients, scores = SaliencyModel(model).gradients(rows)
    score = LayerScore(model, len(model.layers) - 1)
    step = 1e-2
    for row, gradient, row_scores in zip(rows, gradients, scores):
        predicted = np.argmax(row_scores)
        for feature in range(6):
            up, down = row.copy(), row.copy()
            up[feature] += step
            down[feature] -= step
            values = np.asarray(score(np.stack([up, down])))[:, predicted]
            assert np.isclose((values[0] - values[1]) / (2 * step), gradient[feature], atol=1e-3)


def test_feature_names_are_kept_with_tabular_saliency(tmp_path):
    model, _ = dense_tabular()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    names = ["age", "height", "weight", "income", "rooms", "pets"]
    callbacks = CustomCallbacks(str(tmp_path), visualization_inputs=x[:1], feature_names=names)
    callbacks.register_saliency_maps()
    model.fit(x, keras.utils.to_categorical(np.arange(8) % 3, 3), verbose=0,
              callbacks=callbacks.get_list())
    result = storage.read_latest(str(tmp_path), "saliency_maps.pickle", "input_0")
    assert result["feature_names"] == names


def test_a_sigmoid_output_is_scored_by_its_logit():
    model, _ = sigmoid_binary()
    images = np.random.default_rng(4).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
    score = LayerScore(model, len(model.layers) - 1)
    logits = keras.Model(model.inputs, model.layers[-1].input)(images) @ model.layers[-1].kernel \
        + model.layers[-1].bias
    np.testing.assert_allclose(np.asarray(score(images)), np.asarray(logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model(images)), 1 / (1 + np.exp(-np.asarray(logits))),
                               rtol=1e-5)  # the model itself is untouched
