"""The attribution methods as callbacks: one declaration each, one AttributionMaps class, the
stored display format and class info, and switching off with a reason."""
import json

import keras
import numpy as np
import pytest
from test_callbacks import tiny_data, tiny_model, write_images

from custom_keras import registry, storage
from custom_keras.callbacks import CustomCallbacks, signed_to_uint8
from custom_keras.techniques import attribution
from custom_keras.techniques.common import scale_by_max

IMAGES = ("a.png", "b_rgb.png")
LABELS = {"a.png": 1, "b_rgb.png": 0}
CLASS_NAMES = ["circle", "square", "star"]


@pytest.fixture(autouse=True)
def _fresh_session(monkeypatch):
    monkeypatch.delenv(storage.RUN_DIR_ENV, raising=False)
    keras.backend.clear_session()


def techniques(run_dir):
    with open(storage.results_path(run_dir, storage.TECHNIQUES_FILE)) as f:
        return json.load(f)


def latest_snapshot(run_dir, technique):
    entries = storage.read_history_index(run_dir, technique.results_file)[0]
    return len(entries), storage.read_snapshot(run_dir, technique.results_file, entries[-1])


def fit(run_dir, register, model=None, x=None, y=None, **settings):
    callbacks = CustomCallbacks(run_dir, base_interval=2, **settings)
    register(callbacks)
    if x is None:
        x, y = tiny_data(16)
    model = model or tiny_model()
    history = model.fit(x, y, batch_size=8, epochs=1, callbacks=callbacks.get_list(), verbose=0)
    return model, history


def register_all_eight(callbacks):
    callbacks.register_grad_cam()
    callbacks.register_grad_cam_plus_plus(class_index=2)
    callbacks.register_score_cam(class_index="label")
    callbacks.register_guided_backprop()
    callbacks.register_smooth_grad(samples=4)
    callbacks.register_integrated_gradients(steps=8)
    callbacks.register_occlusion(patch=4, stride=2)
    callbacks.register_lrp()


def test_a_training_with_all_eight_methods_writes_each_results_file_in_the_display_format(tmp_path):
    run_dir = str(tmp_path)
    write_images(run_dir, IMAGES)
    model, history = fit(run_dir, register_all_eight, visualization_labels=LABELS,
                         class_names=CLASS_NAMES)
    assert len(history.history["loss"]) == 1
    record = techniques(run_dir)
    inputs = storage.read_visualization_inputs(run_dir)
    batch = np.stack([inputs[name] for name in IMAGES])
    probabilities = model(batch).numpy()  # the softmax of the scores (in the last Dense)
    # the last snapshot came after the last batch: the model has the weights it saw
    expected = {"grad_cam": np.stack([scale_by_max(m) for m in attribution.grad_cam(model, batch)]),
                "lrp": np.stack([signed_to_uint8(m) for m in attribution.lrp(model, batch)])}

    for technique in registry.ATTRIBUTION_TECHNIQUES:
        assert record[technique.key]["state"] == "active", record[technique.key]
        assert technique.results_file == technique.key + ".pickle"
        snapshots, snapshot = latest_snapshot(run_dir, technique)
        assert snapshots == 2  # stage 0 and after batch 2
        assert storage.read_latest(run_dir, technique.results_file).keys() == \
            snapshot["images"][IMAGES[-1]].keys()
        for i, name in enumerate(IMAGES):
            result, info = snapshot["images"][name], snapshot["info"][name]
            assert result["method"] == technique.key
            assert result["signed"] == (technique.display == registry.SIGNED)
            assert result["map"].dtype == np.uint8
            if technique.display == registry.IMAGE_LIKE:
                assert result["map"].shape == (8, 8, 1)
                assert result["guided_grad_cam"].shape == (8, 8, 1)
                assert result["guided_grad_cam"].dtype == np.uint8
            else:
                assert result["map"].shape == (8, 8)
            if technique.display == registry.UNSIGNED:  # all 0 where ReLU left nothing
                assert result["map"].max() in (0, 255)
            if technique.display == registry.SIGNED:
                assert result["map"].min() == 0 or result["map"].max() == 255
            if technique.key in expected:
                np.testing.assert_allclose(result["map"], expected[technique.key][i], atol=1)

            predicted = int(np.argmax(probabilities[i]))
            explained = {"grad_cam_plus_plus": 2, "score_cam": LABELS[name]}.get(
                technique.key, predicted)
            source = {"grad_cam_plus_plus": "fixed", "score_cam": "label"}.get(
                technique.key, "predicted")
            assert info == {"class_index": explained, "class_source": source,
                            "predicted_class": predicted,
                            "probability": pytest.approx(probabilities[i, explained], rel=1e-4),
                            "class_names": CLASS_NAMES}


def test_signed_maps_put_zero_at_128_and_the_largest_magnitude_at_the_ends():
    values = np.array([[[-2.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.5, -0.5]]])  # (2, 2, 2)
    np.testing.assert_array_equal(signed_to_uint8(values), [[0, 128], [255, 128]])
    np.testing.assert_array_equal(signed_to_uint8(np.zeros((2, 2))), np.full((2, 2), 128))


@pytest.mark.parametrize("labels", [[1, 0], np.eye(3)[[1, 0]], LABELS])
def test_class_index_label_takes_the_labels_as_a_list_one_hot_rows_or_by_image_name(
        tmp_path, labels):
    run_dir = str(tmp_path)
    write_images(run_dir, IMAGES)
    fit(run_dir, lambda c: c.register_grad_cam(class_index="label"), visualization_labels=labels)
    _, snapshot = latest_snapshot(run_dir, registry.get("grad_cam"))
    assert [snapshot["info"][name]["class_index"] for name in IMAGES] == [1, 0]
    assert {info["class_source"] for info in snapshot["info"].values()} == {"label"}


def test_class_index_label_without_labels_switches_the_method_off_with_the_reason(tmp_path):
    run_dir = str(tmp_path)
    write_images(run_dir, IMAGES)
    _, history = fit(run_dir, lambda c: (c.register_occlusion(class_index="label", patch=4),
                                         c.register_grad_cam()))
    assert len(history.history["loss"]) == 1
    record = techniques(run_dir)
    assert record["occlusion"]["state"] == "switched_off"
    assert 'class_index="label" needs the true class' in record["occlusion"]["reason"]
    assert "visualization_labels=" in record["occlusion"]["reason"]
    assert record["grad_cam"]["state"] == "active"


def test_labels_that_miss_an_image_switch_the_method_off_naming_it(tmp_path):
    run_dir = str(tmp_path)
    write_images(run_dir, IMAGES)
    fit(run_dir, lambda c: c.register_grad_cam(class_index="label"),
        visualization_labels={"a.png": 1})
    reason = techniques(run_dir)["grad_cam"]["reason"]
    assert reason.startswith("visualization_labels has no class for b_rgb.png")


def test_a_class_number_the_model_lacks_switches_the_method_off(tmp_path):
    run_dir = str(tmp_path)
    write_images(run_dir, IMAGES)
    fit(run_dir, lambda c: c.register_grad_cam(class_index=7))
    record = techniques(run_dir)["grad_cam"]
    assert record["state"] == "switched_off" and "class numbers must be in 0..2" in record["reason"]


def test_class_names_that_do_not_match_the_classes_switch_the_method_off(tmp_path):
    run_dir = str(tmp_path)
    write_images(run_dir, IMAGES)
    fit(run_dir, lambda c: c.register_grad_cam(), class_names=["one", "two"])
    assert techniques(run_dir)["grad_cam"]["reason"] == (
        "class_names has 2 names for a model with 3 classes")


def dense_model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(6, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    return model


def test_a_dense_only_model_switches_grad_cam_off_with_a_reason_and_training_completes(
        tmp_path, capfd):
    run_dir = str(tmp_path)
    write_images(run_dir, IMAGES)
    _, history = fit(run_dir, lambda c: (c.register_grad_cam(), c.register_guided_backprop(),
                                         c.register_lrp()), model=dense_model())
    assert len(history.history["loss"]) == 1
    record = techniques(run_dir)
    assert record["grad_cam"]["state"] == "switched_off"
    assert record["grad_cam"]["reason"] == (
        "Grad-CAM needs a layer with a spatial output: the model has no layer with a spatial "
        "output (N, height, width, channels)")
    assert "Grad-CAM switched off when training began" in capfd.readouterr().err
    # guided backpropagation goes on without guided Grad-CAM, and says so
    assert record["guided_backprop"]["state"] == "active"
    assert record["guided_backprop"]["reason"].startswith("without guided grad cam: ValueError")
    _, snapshot = latest_snapshot(run_dir, registry.get("guided_backprop"))
    assert "guided_grad_cam" not in snapshot["images"]["a.png"]
    assert record["lrp"]["state"] == "active"


def test_a_feature_vector_model_gets_values_from_the_methods_that_handle_it(tmp_path):
    run_dir = str(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    fit(run_dir, lambda c: (c.register_integrated_gradients(steps=8), c.register_occlusion()),
        model=model, x=x, y=y, visualization_inputs=x[:2])
    record = techniques(run_dir)
    assert record["occlusion"]["state"] == "switched_off"
    assert record["occlusion"]["reason"] == (
        "Occlusion needs an image input (H, W, C); this model's input is a feature vector (5,)")
    _, snapshot = latest_snapshot(run_dir, registry.get("integrated_gradients"))
    result = snapshot["images"]["input_0"]
    assert result["values"].dtype == np.float32 and result["values"].shape == (5,)
    assert result["signed"] is True and "map" not in result
    np.testing.assert_allclose(result["values"], attribution.integrated_gradients(
        model, x[:1], steps=8)[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("register, message", [
    (lambda c: c.register_grad_cam(class_index="true"), "class_index must be None"),
    (lambda c: c.register_grad_cam(class_index=-1), "class_index must be None"),
    (lambda c: c.register_smooth_grad(interval=0), "interval must be a whole number"),
])
def test_arguments_wrong_whatever_the_model_fail_at_registration(tmp_path, register, message):
    with pytest.raises(ValueError, match=message):
        register(CustomCallbacks(str(tmp_path)))


def test_a_wrong_argument_names_the_register_call_and_its_parameters(tmp_path):
    with pytest.raises(TypeError, match=r"register_lrp\(rule='epsilon', .*interval=None\): got an "
                                        "unexpected keyword argument 'rules'"):
        CustomCallbacks(str(tmp_path)).register_lrp(rules="z_plus")


@pytest.mark.parametrize("labels", ["seven", [[0.5, "x"]], {3: 1}])
def test_labels_that_are_no_classes_fail_at_the_callbacks(tmp_path, labels):
    with pytest.raises(TypeError, match="visualization_labels"):
        CustomCallbacks(str(tmp_path), visualization_labels=labels)
