"""The callback library: files, schedule, derived per-batch values, bad input, failures, kills."""
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from PIL import Image

from custom_keras import registry, storage
from custom_keras.callbacks import (CustomCallbacks, DeepVisualization, NetworkSaver,
                                    SaliencyMaps, TrainingProgress)

TECHNIQUE_FILES = ("layer_activations.pickle", "saliency_maps.pickle",
                   "deconvolutional_network.pickle", "deep_visualization.pickle")


@pytest.fixture(autouse=True)
def _fresh_session(monkeypatch):
    monkeypatch.delenv(storage.RUN_DIR_ENV, raising=False)
    keras.backend.clear_session()  # layer names start again at "conv2d", "dense"


def write_images(run_dir, names=("a.png", "b.png")):
    """Grey 8x8 images, plus an RGB 16x16 one when asked for by a name ending in _rgb.png."""
    os.makedirs(os.path.join(run_dir, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        if name.endswith("_rgb.png"):
            image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")
        else:
            image = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L")
        path = os.path.join(run_dir, "images", name)
        image.save(path)
        os.utime(path, (1000 + i, 1000 + i))  # the last name is the newest image


def tiny_model(metrics=("accuracy",)):
    """Layers: 0 input, 1 conv, 2 pool, 3 flatten, 4 dense softmax."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, (3, 3), activation="relu")(inputs)
    x = keras.layers.MaxPooling2D((2, 2))(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=list(metrics))
    return model


def tiny_data(samples=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((samples, 8, 8, 1), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 3, samples), 3)
    return x, y


def register_all(callbacks):
    callbacks.register_network_saver()
    callbacks.register_training_progress()
    callbacks.register_layer_activations()
    callbacks.register_saliency_maps()
    callbacks.register_deconvolutional_network(2, feat_map_amount=2)
    callbacks.register_deep_visualization([(4, 0), (4, 2), (1, (2, 3, 1))], learning_rate=10,
                                          no_of_iterations=3, l2_decay=0.0001, blur_interval=2,
                                          blur_std=0.5)


def history(run_dir, file_name):
    return storage.read_history_index(run_dir, file_name)[0]


def read_rows(path):
    with open(path) as f:
        return [line.split() for line in f]


def test_all_callbacks_write_appendix_d_files(tmp_path):
    run_dir = str(tmp_path)
    write_images(run_dir, ("a.png", "b.png", "c_rgb.png"))
    callbacks = CustomCallbacks(run_dir, base_interval=3)
    register_all(callbacks)
    model = tiny_model()
    x, y = tiny_data()
    # 40 samples / 8 = 5 batches per epoch, 2 epochs = 10 batches.
    model.fit(x, y, batch_size=8, epochs=2, validation_data=tiny_data(16, seed=1),
              callbacks=callbacks.get_list(), verbose=0)

    activations = storage.read_latest(run_dir, "layer_activations.pickle")
    assert [name for name, _ in activations] == [
        "Layer 1: conv2d", "Layer 2: max_pooling2d", "Layer 4: dense"]
    assert [(a.dtype, a.shape) for _, a in activations] == [
        (np.uint8, (4, 6, 6)), (np.uint8, (4, 3, 3)), (np.uint8, (3,))]

    saliency = storage.read_latest(run_dir, "saliency_maps.pickle")
    assert saliency.dtype == np.uint8 and saliency.shape == (8, 8, 1)

    deconvolution = storage.read_latest(run_dir, "deconvolutional_network.pickle")
    assert len(deconvolution) == 2
    for image, layer_name, feat_map_no in deconvolution:
        assert image.dtype == np.uint8 and image.shape == (8, 8, 1)
        assert layer_name == "max_pooling2d" and isinstance(feat_map_no, int) and 0 <= feat_map_no < 4

    deep = storage.read_latest(run_dir, "deep_visualization.pickle")
    assert [(layer_name, unit) for _, layer_name, unit, _ in deep] == [
        ("dense", 0), ("dense", 2), ("conv2d", (2, 3, 1))]
    for image, _, _, loss_value in deep:
        assert image.dtype == np.uint8 and image.shape == (8, 8, 1)
        assert isinstance(loss_value, float)

    # One snapshot at stage 0 and one every 3 batches: 1 + floor(10 / 3).
    for file_name in TECHNIQUE_FILES:
        entries = history(run_dir, file_name)
        assert [e["stage"] for e in entries] == [0, 1, 2, 3]
        assert [(e["epoch"], e["batch"], e["step"]) for e in entries] == [
            (0, 0, 0), (0, 3, 3), (1, 1, 6), (1, 4, 9)]
        assert [e["progress"] for e in entries] == pytest.approx([0.0, 0.6, 1.2, 1.8])
        snapshot = storage.read_snapshot(run_dir, file_name, entries[-1])
        assert sorted(snapshot["images"]) == ["a.png", "b.png", "c_rgb.png"]
        for image_name in ("a.png", "b.png", "c_rgb.png"):
            assert os.path.exists(storage.per_image_path(run_dir, image_name, file_name))

    # Every image is visualized: per-image results differ, the newest is the latest file.
    per_image = {name: storage.read_latest(run_dir, "saliency_maps.pickle", name)
                 for name in ("a.png", "b.png", "c_rgb.png")}
    assert not np.array_equal(per_image["a.png"], per_image["b.png"])
    np.testing.assert_array_equal(per_image["c_rgb.png"], saliency)
    info = storage.read_snapshot(run_dir, "saliency_maps.pickle",
                                 history(run_dir, "saliency_maps.pickle")[-1])["info"]
    assert set(info["a.png"]) == {"predicted_class", "confidence"}
    assert info["a.png"]["predicted_class"] in (0, 1, 2)
    assert 0 < info["a.png"]["confidence"] <= 1

    # The RGB 16x16 image is fed as grey 8x8, uint8 before scaling.
    inputs = storage.read_input_images(run_dir)
    assert sorted(inputs) == ["a.png", "b.png", "c_rgb.png"]
    assert all(a.dtype == np.uint8 and a.shape == (8, 8, 1) for a in inputs.values())
    expected = np.asarray(Image.open(os.path.join(run_dir, "images", "a.png")))[..., np.newaxis]
    np.testing.assert_array_equal(inputs["a.png"], expected)

    rows = read_rows(storage.results_path(run_dir, "training_progress.txt"))
    assert len(rows) == 10 and all(len(row) == 3 for row in rows)
    assert [float(row[0]) for row in rows] == pytest.approx(
        [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8])
    assert all(0 <= float(row[1]) <= 1 and float(row[2]) > 0 for row in rows)
    val_rows = read_rows(storage.results_path(run_dir, "training_progress_val.txt"))
    assert [row[0] for row in val_rows] == ["1", "2"] and all(len(row) == 3 for row in val_rows)

    # Named after the running script (here pytest's), without temporary files left over.
    [network] = os.listdir(os.path.join(run_dir, "networks"))
    saved = keras.saving.load_model(os.path.join(run_dir, "networks", network))
    np.testing.assert_allclose(saved.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_interval_overrides_base_interval(tmp_path):
    run_dir = str(tmp_path)
    write_images(run_dir)
    callbacks = CustomCallbacks(run_dir, base_interval=3)
    callbacks.register_saliency_maps(interval=4)
    callbacks.register_layer_activations()
    x, y = tiny_data()
    tiny_model().fit(x, y, batch_size=8, epochs=2, callbacks=callbacks.get_list(), verbose=0)
    assert [e["step"] for e in history(run_dir, "saliency_maps.pickle")] == [0, 4, 8]
    assert [e["step"] for e in history(run_dir, "layer_activations.pickle")] == [0, 3, 6, 9]


def test_schedule_with_several_batches_per_call(tmp_path):
    """steps_per_execution=2: Keras reports batches 1, 3, 4 of each 5-batch epoch."""
    run_dir = str(tmp_path)
    write_images(run_dir)
    model = tiny_model()
    model.compile(optimizer="adam", loss="categorical_crossentropy", steps_per_execution=2)
    x, y = tiny_data()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[SaliencyMaps(run_dir, interval=3)])
    assert [e["step"] for e in history(run_dir, "saliency_maps.pickle")] == [0, 4, 7, 9]


def test_per_batch_values_are_derived_exactly_with_a_smaller_last_batch(tmp_path):
    """With the learning rate 0 every batch's own loss can be computed directly."""
    rng = np.random.default_rng(0)
    x = rng.random((22, 3), dtype=np.float32)
    y = rng.random((22, 1), dtype=np.float32)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse",
                  metrics=["mae", keras.metrics.RootMeanSquaredError(name="rmse")])
    progress = TrainingProgress(str(tmp_path))
    history_ = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[progress],
                         verbose=0)

    columns, rows, _ = storage.read_table(str(tmp_path), storage.results_path(
        str(tmp_path), "training_progress.tsv"))
    assert columns == ["progress", "epoch", "batch", "loss", "mae", "rmse",
                       "loss_avg", "mae_avg", "rmse_avg"]
    table = {name: np.array([row[i] for row in rows]) for i, name in enumerate(columns)}
    predictions = model.predict(x, verbose=0)
    batches = [slice(0, 8), slice(8, 16), slice(16, 22)]  # the last batch has 6 samples
    loss = [np.mean((predictions[b] - y[b]) ** 2) for b in batches] * 2
    mae = [np.mean(np.abs(predictions[b] - y[b])) for b in batches] * 2
    np.testing.assert_allclose(table["loss"], loss, rtol=1e-4)
    np.testing.assert_allclose(table["mae"], mae, rtol=1e-4)
    np.testing.assert_allclose(table["progress"], [0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3], rtol=1e-9)
    # The sample-weighted mean of the derived values is Keras' epoch average.
    sizes = np.array([8, 8, 6])
    for epoch in range(2):
        epoch_losses = table["loss"][3 * epoch:3 * epoch + 3]
        np.testing.assert_allclose(np.sum(epoch_losses * sizes) / 22,
                                   history_.history["loss"][epoch], rtol=1e-4)
        assert table["loss_avg"][3 * epoch + 2] == pytest.approx(history_.history["loss"][epoch],
                                                                 rel=1e-6)

    # No accuracy metric: the Appendix D accuracy column is nan.
    rows = read_rows(storage.results_path(str(tmp_path), "training_progress.txt"))
    assert all(row[1] == "nan" for row in rows)
    np.testing.assert_allclose([float(row[2]) for row in rows], loss, rtol=1e-4)
    assert not os.path.exists(storage.results_path(str(tmp_path), "training_progress_val.txt"))


def test_progress_rows_are_written_in_chunks_and_all_by_the_end(tmp_path, monkeypatch):
    """The first row of a fit at once, later rows at most every FLUSH_SECONDS, every row by the
    end of each epoch; the same rows as one write per batch."""
    monkeypatch.setattr(TrainingProgress, "FLUSH_SECONDS", 3600)
    path = storage.results_path(str(tmp_path), "training_progress.txt")
    table = storage.results_path(str(tmp_path), "training_progress.tsv")
    seen = []

    def rows_on_disk(batch, logs):
        seen.append((len(read_rows(path)), len(storage.read_table(str(tmp_path), table)[1])))

    x, y = tiny_data(40)
    tiny_model().fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[
        TrainingProgress(str(tmp_path)), keras.callbacks.LambdaCallback(on_batch_end=rows_on_disk)])
    assert seen == [(1, 1)] * 5 + [(5, 5)] * 5
    rows = read_rows(path)
    assert [float(row[0]) for row in rows] == [epoch + batch / 5 for epoch in range(2)
                                               for batch in range(5)]
    assert len(storage.read_table(str(tmp_path), table)[1]) == 10


def test_validation_tables_record_every_validation_metric(tmp_path):
    model = tiny_model(metrics=("accuracy", "mse"))
    x, y = tiny_data()
    fit = model.fit(x, y, batch_size=8, epochs=2, validation_data=tiny_data(16, seed=1),
                    callbacks=[TrainingProgress(str(tmp_path))], verbose=0)
    columns, rows, _ = storage.read_table(str(tmp_path), storage.results_path(
        str(tmp_path), "training_progress_val.tsv"))
    assert columns == ["epoch", "val_accuracy", "val_loss", "val_mse"]
    assert [row[0] for row in rows] == [1, 2]
    np.testing.assert_allclose([row[3] for row in rows], fit.history["val_mse"], rtol=1e-6)
    val_rows = read_rows(storage.results_path(str(tmp_path), "training_progress_val.txt"))
    np.testing.assert_allclose([[float(v) for v in row[1:]] for row in val_rows],
                               np.transpose([fit.history["val_accuracy"], fit.history["val_loss"]]),
                               rtol=1e-6)
    columns, _, _ = storage.read_table(str(tmp_path), storage.results_path(
        str(tmp_path), "training_progress.tsv"))
    assert {"accuracy", "loss", "mse", "accuracy_avg", "loss_avg", "mse_avg"} <= set(columns)


def test_sequential_model_with_custom_pre_and_postprocess(tmp_path):
    """Sequential models have no InputLayer in model.layers: layer 0 is the first conv."""
    run_dir = str(tmp_path)
    write_images(run_dir)
    seen = []

    def preprocess(image):
        seen.append((image.dtype, float(image.max())))
        return image / 127.5 - 1

    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, (3, 3)),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    callbacks = CustomCallbacks(run_dir, custom_preprocess=preprocess,
                                custom_postprocess=lambda image: 255 - image, base_interval=5)
    callbacks.register_layer_activations()
    callbacks.register_saliency_maps()
    callbacks.register_deconvolutional_network(0, feat_map_nos=[1])
    x, y = tiny_data()
    model.fit(x, y, batch_size=8, epochs=1, callbacks=callbacks.get_list(), verbose=0)
    assert seen[0][0] == np.float32 and 1 < seen[0][1] <= 255
    assert [name for name, _ in storage.read_latest(run_dir, "layer_activations.pickle")] == [
        "Layer 0: conv2d", "Layer 2: dense"]
    [(image, layer_name, feat_map_no)] = storage.read_latest(run_dir,
                                                             "deconvolutional_network.pickle")
    assert (image.dtype, image.shape, layer_name, feat_map_no) == (np.uint8, (8, 8, 1), "conv2d", 1)
    # The postprocess inverts the saliency map, so its maximum (255) became 0.
    assert storage.read_latest(run_dir, "saliency_maps.pickle").min() == 0


# --- bad input ---------------------------------------------------------------

def fit_with(run_dir, register):
    callbacks = CustomCallbacks(run_dir, base_interval=2)
    register(callbacks)
    x, y = tiny_data(16)
    tiny_model().fit(x, y, batch_size=8, epochs=1, callbacks=callbacks.get_list(), verbose=0)


def techniques(run_dir):
    with open(storage.results_path(run_dir, storage.TECHNIQUES_FILE)) as f:
        return json.load(f)


@pytest.mark.parametrize("register, key, reason", [
    (lambda c: c.register_deconvolutional_network(9, feat_map_amount=1), "deconvolutional_network",
     "feat_map_layer_no=9 is out of range"),
    (lambda c: c.register_deconvolutional_network(3, feat_map_amount=1), "deconvolutional_network",
     "feat_map_layer_no=3 is layer 3 .*Flatten.*no feature maps"),
    (lambda c: c.register_deconvolutional_network(1, feat_map_nos=[7]), "deconvolutional_network",
     "feat_map_nos: map number 7 is out of range"),
    (lambda c: c.register_deep_visualization([(4, 3)], 1, 2), "deep_visualization",
     r"units_to_visualize\[0\]: index 3 is out of range"),
    (lambda c: c.register_deep_visualization([(12, 0)], 1, 2), "deep_visualization",
     "units_to_visualize.*layer_no=12 is out of range"),
])
def test_arguments_the_model_rejects_switch_the_technique_off_and_training_goes_on(
        tmp_path, capfd, register, key, reason):
    run_dir = str(tmp_path)
    write_images(run_dir)
    callbacks = CustomCallbacks(run_dir, base_interval=1)
    register(callbacks)
    callbacks.register_saliency_maps()
    callbacks.register_training_progress()
    x, y = tiny_data(16)
    fit = tiny_model().fit(x, y, batch_size=8, epochs=2, callbacks=callbacks.get_list(), verbose=0)

    assert len(fit.history["loss"]) == 2
    record = techniques(run_dir)
    assert record[key]["state"] == "switched_off"
    assert re.search(reason, record[key]["reason"]), record[key]["reason"]
    assert record[key]["registered"] and record[key]["params"]["interval"] == 1
    assert record["saliency_maps"]["state"] == "active"
    assert record["saliency_maps"]["first_snapshot_step"] == 0
    assert record["training_progress"]["state"] == "active"
    assert "layer_activations" not in record  # not registered
    results_file = registry.get(key).results_file
    assert history(run_dir, results_file) == []
    assert [e["step"] for e in history(run_dir, "saliency_maps.pickle")] == [0, 1, 2, 3, 4]
    assert len(read_rows(storage.results_path(run_dir, "training_progress.txt"))) == 4
    errors = [line for line in capfd.readouterr().err.splitlines() if "[visualizer]" in line]
    assert len(errors) == 1 and "switched off when training began" in errors[0]


@pytest.mark.parametrize("register, argument", [
    (lambda c: c.register_saliency_maps(interval=0), "interval"),
    (lambda c: c.register_layer_activations(interval=2.5), "interval"),
    (lambda c: c.register_layer_activations(exclude_layers=("Dropout",)), "exclude_layers"),
    (lambda c: c.register_deconvolutional_network(1), "feat_map_amount"),
    (lambda c: c.register_deconvolutional_network("3", feat_map_amount=1), "feat_map_layer_no"),
    (lambda c: c.register_deconvolutional_network(1, feat_map_nos=[1, 1]), "feat_map_nos"),
    (lambda c: c.register_deep_visualization([4, 0], 1, 2), "units_to_visualize"),
    (lambda c: c.register_deep_visualization([(4, 0)], 1, 2, l2_decay=2), "l2_decay"),
    (lambda c: c.register_deep_visualization([(4, 0)], 1, 0), "no_of_iterations"),
    (lambda c: c.register_deep_visualization([(4, 0)], -1, 2), "learning_rate"),
])
def test_bad_arguments_fail_at_registration(tmp_path, register, argument):
    write_images(str(tmp_path))
    with pytest.raises((ValueError, TypeError), match=argument):
        register(CustomCallbacks(str(tmp_path)))


def test_bad_callback_wrapper_arguments(tmp_path):
    with pytest.raises(ValueError, match="base_interval"):
        CustomCallbacks(str(tmp_path), base_interval=0)
    with pytest.raises(TypeError, match="custom_preprocess"):
        CustomCallbacks(str(tmp_path), custom_preprocess="scale")


def test_without_an_image_the_image_techniques_say_so_and_the_rest_run(tmp_path):
    run_dir = str(tmp_path)
    callbacks = CustomCallbacks(run_dir, base_interval=2)
    register_all(callbacks)
    x, y = tiny_data(16)
    fit = tiny_model().fit(x, y, batch_size=8, epochs=1, callbacks=callbacks.get_list(), verbose=0)

    assert len(fit.history["loss"]) == 1
    record = techniques(run_dir)
    for key in ("layer_activations", "saliency_maps", "deconvolutional_network"):
        assert record[key]["state"] == "switched_off"
        assert record[key]["reason"].startswith("needs an image: the images folder holds none")
    for key in ("deep_visualization", "training_progress", "network_saver"):
        assert record[key]["state"] == "active" and record[key]["reason"] is None
    assert [e["step"] for e in history(run_dir, "deep_visualization.pickle")] == [0, 2]


def test_an_image_array_works_as_well_as_the_images_folder(tmp_path):
    run_dir = str(tmp_path)
    x, y = tiny_data(16)
    callbacks = CustomCallbacks(run_dir, visualization_inputs=x[:2])
    register_all(callbacks)
    tiny_model().fit(x, y, batch_size=8, epochs=1, callbacks=callbacks.get_list(), verbose=0)

    record = techniques(run_dir)
    assert {key: entry["state"] for key, entry in record.items()} == dict.fromkeys(record, "active")
    assert all(record[key]["input_kind"] == "image" for key in registry_keys(TECHNIQUE_FILES))
    saliency = storage.read_latest(run_dir, "saliency_maps.pickle", "input_1")
    assert saliency.dtype == np.uint8 and saliency.shape == (8, 8, 1)
    assert sorted(storage.read_input_images(run_dir)) == ["input_0", "input_1"]
    fed = storage.safe_load(run_dir, storage.results_path(run_dir, storage.VISUALIZATION_INPUTS_FILE))
    np.testing.assert_array_equal(fed["input_1"], x[1])


def registry_keys(file_names):
    return [t.key for t in registry.TECHNIQUES if t.results_file in file_names]


def test_unreadable_image_fails_at_registration(tmp_path):
    write_images(str(tmp_path))
    with open(os.path.join(str(tmp_path), "images", "broken.png"), "wb") as f:
        f.write(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png.*cannot be read"):
        CustomCallbacks(str(tmp_path)).register_layer_activations()


def test_preprocess_with_the_wrong_shape_switches_the_technique_off(tmp_path):
    write_images(str(tmp_path))
    callbacks = CustomCallbacks(str(tmp_path), custom_preprocess=lambda image: image[:4])
    callbacks.register_saliency_maps()
    x, y = tiny_data(16)
    tiny_model().fit(x, y, batch_size=8, callbacks=callbacks.get_list(), verbose=0)
    entry = techniques(str(tmp_path))["saliency_maps"]
    assert entry["state"] == "switched_off"
    assert entry["reason"].startswith("ValueError: custom_preprocess must return an array")


def test_a_feature_vector_model_without_visualization_inputs_says_what_to_pass(tmp_path):
    write_images(str(tmp_path))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    fit = model.fit(np.zeros((4, 3)), np.zeros((4, 1)), verbose=0,
                    callbacks=[SaliencyMaps(str(tmp_path))])
    assert len(fit.history["loss"]) == 1
    entry = techniques(str(tmp_path))["saliency_maps"]
    assert entry["state"] == "switched_off"
    assert entry["reason"].startswith("needs visualization_inputs: a model with tabular input (3,)")
    assert "visualization_inputs=array of shape (N,) + (3,)" in entry["reason"]


def test_a_sequential_model_without_input_takes_stage_0_after_its_first_batch(tmp_path):
    run_dir = str(tmp_path)
    write_images(run_dir)
    model = keras.Sequential([keras.layers.Conv2D(2, (3, 3), activation="relu"),
                              keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    callbacks = CustomCallbacks(run_dir, base_interval=2)
    callbacks.register_layer_activations()
    callbacks.register_saliency_maps()
    callbacks.register_deconvolutional_network(0, feat_map_amount=2)
    callbacks.register_deep_visualization([(3, 0)], 1, 2)
    seen = []
    spy = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: seen.append(techniques(run_dir)["saliency_maps"]))
    x, y = tiny_data(32)
    fit = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                    callbacks=[spy] + callbacks.get_list())

    assert len(fit.history["loss"]) == 2
    assert seen[0]["state"] == "waiting" and seen[0]["first_snapshot_step"] == 1
    assert "first batch" in seen[0]["reason"]
    record = techniques(run_dir)
    for file_name in TECHNIQUE_FILES:
        key = registry_keys([file_name])[0]
        assert (record[key]["state"], record[key]["first_snapshot_step"]) == ("active", 1), key
        entries = history(run_dir, file_name)
        assert [(e["stage"], e["step"]) for e in entries] == [(0, 1), (1, 2), (2, 4), (3, 6), (4, 8)]


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs):
        return self.dense(inputs)


def test_a_subclassed_model_switches_the_techniques_off_after_its_first_batch(tmp_path):
    model = Subclassed()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    callbacks = CustomCallbacks(str(tmp_path), visualization_inputs=np.zeros((1, 4)))
    callbacks.register_saliency_maps()
    callbacks.register_training_progress()
    fit = model.fit(np.zeros((8, 4)), np.zeros((8, 3)), batch_size=4, epochs=2, verbose=0,
                    callbacks=callbacks.get_list())
    assert len(fit.history["loss"]) == 2
    entry = techniques(str(tmp_path))["saliency_maps"]
    assert (entry["state"], entry["first_snapshot_step"]) == ("switched_off", None)
    assert entry["reason"].startswith("needs a Sequential or functional model")


# --- failures during training ------------------------------------------------

def test_a_technique_failing_at_a_snapshot_is_switched_off_and_training_goes_on(tmp_path, capfd):
    run_dir = str(tmp_path)
    write_images(run_dir)
    calls = []

    def postprocess(image):
        calls.append(1)
        if len(calls) == 3:  # the first image of stage 1; the second image is never reached
            raise RuntimeError("disk\nfull")
        return image

    callbacks = CustomCallbacks(run_dir, custom_postprocess=postprocess, base_interval=2)
    callbacks.register_saliency_maps()
    callbacks.register_training_progress()
    x, y = tiny_data()
    fit = tiny_model().fit(x, y, batch_size=8, epochs=1, callbacks=callbacks.get_list(), verbose=0)

    assert len(fit.history["loss"]) == 1
    errors = [line for line in capfd.readouterr().err.splitlines() if "[visualizer]" in line]
    assert errors == ["[visualizer] saliency maps switched off at stage 1: RuntimeError: disk full"]
    assert techniques(run_dir)["saliency_maps"]["state"] == "switched_off"
    assert techniques(run_dir)["saliency_maps"]["reason"] == "RuntimeError: disk full"
    assert [e["stage"] for e in history(run_dir, "saliency_maps.pickle")] == [0]
    assert sorted(os.listdir(storage.history_dir(run_dir, "saliency_maps.pickle"))) == [
        "000000000.pickle", "index.jsonl"]
    assert len(read_rows(storage.results_path(run_dir, "training_progress.txt"))) == 5


def test_the_network_saver_keeps_every_epochs_network_when_asked(tmp_path):
    run_dir = str(tmp_path)
    x, y = tiny_data(16)
    model = tiny_model()
    weights_after = []
    saver = NetworkSaver(run_dir, keep_epochs=True)
    record_weights = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: weights_after.append(model.get_weights()))
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[saver, record_weights])
    stem = saver.stem
    assert storage.list_network_epochs(run_dir, stem) == [1, 2, 3]
    for epoch, weights in enumerate(weights_after, start=1):
        kept = keras.saving.load_model(
            os.path.join(run_dir, storage.network_epoch_file(stem, epoch)))
        for saved, expected in zip(kept.get_weights(), weights):
            np.testing.assert_array_equal(saved, expected)
    newest = keras.saving.load_model(os.path.join(run_dir, storage.network_file(stem)))
    np.testing.assert_array_equal(newest.get_weights()[0], weights_after[-1][0])


def test_without_keep_epochs_only_the_newest_network_is_kept(tmp_path):
    x, y = tiny_data(16)
    saver = NetworkSaver(str(tmp_path))
    tiny_model().fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[saver])
    assert os.listdir(storage.networks_dir(str(tmp_path))) == [saver.stem + ".keras"]
    assert storage.list_network_epochs(str(tmp_path), saver.stem) == []


def test_a_failing_network_save_prints_one_line_and_training_goes_on(tmp_path, capfd):
    with open(os.path.join(str(tmp_path), "networks"), "w") as f:
        f.write("a file where the networks folder should be")
    x, y = tiny_data(16)
    fit = tiny_model().fit(x, y, batch_size=8, epochs=2, verbose=0,
                           callbacks=[NetworkSaver(str(tmp_path))])
    assert len(fit.history["loss"]) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if "[visualizer]" in line]
    assert [e.split(":")[0] for e in errors] == ["[visualizer] network saver failed at epoch 1",
                                                "[visualizer] network saver failed at epoch 2"]


def test_a_new_run_starts_a_new_history(tmp_path):
    run_dir = str(tmp_path)
    write_images(run_dir)
    x, y = tiny_data(16)
    for _ in range(2):
        callbacks = CustomCallbacks(run_dir, base_interval=1)
        callbacks.register_saliency_maps()
        callbacks.register_training_progress()
        tiny_model().fit(x, y, batch_size=8, callbacks=callbacks.get_list(), verbose=0)
    assert [e["stage"] for e in history(run_dir, "saliency_maps.pickle")] == [0, 1, 2]
    assert len(read_rows(storage.results_path(run_dir, "training_progress.txt"))) == 2


def test_techniques_are_built_once_per_model(tmp_path):
    run_dir = str(tmp_path)
    write_images(run_dir)
    callbacks = CustomCallbacks(run_dir, base_interval=2)
    register_all(callbacks)
    builds = []
    for callback in callbacks.get_list():
        if hasattr(callback, "build"):
            def counted(build=callback.build, name=type(callback).__name__):
                builds.append(name)
                build()
            callback.build = counted
    model = tiny_model()
    x, y = tiny_data(16)
    for _ in range(2):  # a second fit of the same model reuses the built techniques
        model.fit(x, y, batch_size=8, epochs=1, callbacks=callbacks.get_list(), verbose=0)
    assert sorted(builds) == ["DeconvolutionalNetwork", "DeepVisualization", "LayerActivations",
                              "SaliencyMaps"]
    for file_name in TECHNIQUE_FILES:
        assert [e["step"] for e in history(run_dir, file_name)] == [0, 2, 2, 4]


def test_deep_visualization_without_images_uses_no_image_key(tmp_path):
    callback = DeepVisualization(str(tmp_path), [(4, 1)], 1, 2, interval=100)
    x, y = tiny_data(16)
    tiny_model().fit(x, y, batch_size=8, callbacks=[callback], verbose=0)
    [(image, layer_name, unit, _)] = storage.read_latest(str(tmp_path), "deep_visualization.pickle")
    assert (image.shape, layer_name, unit) == ((8, 8, 1), "dense", 1)
    entry = history(str(tmp_path), "deep_visualization.pickle")[0]
    assert list(storage.read_snapshot(str(tmp_path), "deep_visualization.pickle", entry)["images"]) \
        == ["no_image"]


KILLED_SCRIPT = textwrap.dedent("""
    import os
    import keras
    import numpy as np
    from custom_keras.callbacks import CustomCallbacks

    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(8, (3, 3), activation="relu")(inputs)
    x = keras.layers.MaxPooling2D((2, 2))(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    callbacks = CustomCallbacks(os.path.dirname(os.path.abspath(__file__)), base_interval=1)
    callbacks.register_network_saver()
    callbacks.register_training_progress()
    callbacks.register_layer_activations()
    callbacks.register_saliency_maps()
    callbacks.register_deconvolutional_network(2, feat_map_amount=4)
    callbacks.register_deep_visualization([(4, u) for u in range(4)], 5, 20, blur_interval=2,
                                          blur_std=0.5)
    rng = np.random.default_rng(0)
    x = rng.random((64, 16, 16, 1), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 4, 64), 4)
    print("training", flush=True)
    model.fit(x, y, batch_size=4, epochs=1000, verbose=0, callbacks=callbacks.get_list())
""")


def check_run_folder_is_readable(run_dir):
    """Every latest file, per-image file, history snapshot and table loads completely."""
    pickles = glob.glob(os.path.join(run_dir, "results", "**", "*.pickle"), recursive=True)
    assert pickles
    for path in pickles:  # glob skips the ".tmp-" files a kill may leave behind
        storage.safe_load(run_dir, path)
    for file_name in TECHNIQUE_FILES:
        for entry in history(run_dir, file_name):
            storage.read_snapshot(run_dir, file_name, entry)
    for table in ("training_progress.tsv", "training_progress_val.tsv"):
        storage.read_table(run_dir, storage.results_path(run_dir, table))
    columns, rows, _ = storage.read_table(run_dir, storage.results_path(
        run_dir, "training_progress.tsv"))
    assert all(len(row) == len(columns) for row in rows)
    lines, _ = storage.read_complete_lines(run_dir, storage.results_path(
        run_dir, "training_progress.txt"))
    assert all(len([float(v) for v in line.split()]) == 3 for line in lines)
    for network in glob.glob(os.path.join(run_dir, "networks", "*.keras")):
        keras.saving.load_model(network)


def test_a_run_killed_mid_snapshot_leaves_every_latest_file_readable(tmp_path):
    run_dir = str(tmp_path)
    write_images(run_dir, ("a.png", "b_rgb.png"))
    script = os.path.join(run_dir, "killed.py")
    with open(script, "w") as f:
        f.write(KILLED_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(storage.RUN_DIR_ENV, None)
    rng = random.Random(1)
    for attempt in range(5):
        process = subprocess.Popen([sys.executable, script], cwd=run_dir, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        index = os.path.join(storage.history_dir(run_dir, "deep_visualization.pickle"),
                             storage.HISTORY_INDEX)
        deadline = time.time() + 120
        # Snapshots follow each other without a pause (interval 1), so a random
        # moment after the first ones lands inside one with high probability.
        while time.time() < deadline and process.poll() is None and (
                not os.path.exists(index) or len(history(run_dir, "deep_visualization.pickle")) < 2):
            time.sleep(0.05)
        assert process.poll() is None, process.stdout.read().decode()
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        check_run_folder_is_readable(run_dir)
    assert json.loads(open(index).readline())["stage"] == 0
