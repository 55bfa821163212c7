"""The example scripts run as plain ``python script.py`` and write every result file."""
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from custom_keras import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "scripts", "examples")
IMAGES = sorted(os.listdir(os.path.join(EXAMPLES, "images")))
TECHNIQUE_FILES = ("layer_activations.pickle", "saliency_maps.pickle",
                   "deconvolutional_network.pickle", "deep_visualization.pickle")


def run_example(tmp_path, script, epochs=1):
    """Copy the example and its images to ``tmp_path`` and run it there, as a user would."""
    shutil.copy(os.path.join(EXAMPLES, script), tmp_path)
    shutil.copytree(os.path.join(EXAMPLES, "images"), os.path.join(tmp_path, "images"))
    env = dict(os.environ, EPOCHS=str(epochs), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(storage.RUN_DIR_ENV, None)
    completed = subprocess.run([sys.executable, script], cwd=tmp_path, env=env, timeout=300,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert "[visualizer]" not in completed.stdout
    return str(tmp_path), completed.stdout


def test_example_images_include_grey_and_rgb():
    from PIL import Image
    modes = {name: Image.open(os.path.join(EXAMPLES, "images", name)).mode for name in IMAGES}
    assert "RGB" in modes.values() and "L" in modes.values()


def test_mnist_example_writes_every_appendix_d_file(tmp_path):
    run_dir, output = run_example(tmp_path, "mnist_digits.py")
    assert "Training for 1 epochs" in output and "Validation loss" in output

    activations = storage.read_latest(run_dir, "layer_activations.pickle")
    assert [(name, a.dtype, a.shape) for name, a in activations] == [
        ("Layer 1: conv2d", np.uint8, (32, 26, 26)), ("Layer 2: conv2d_1", np.uint8, (32, 24, 24)),
        ("Layer 3: max_pooling2d", np.uint8, (32, 12, 12)), ("Layer 6: dense", np.uint8, (128,)),
        ("Layer 8: dense_1", np.uint8, (64,)), ("Layer 9: dense_2", np.uint8, (10,))]

    saliency = storage.read_latest(run_dir, "saliency_maps.pickle")
    assert (saliency.dtype, saliency.shape) == (np.uint8, (28, 28, 1))

    deconvolution = storage.read_latest(run_dir, "deconvolutional_network.pickle")
    assert len(deconvolution) == 8
    assert len({feat_map_no for _, _, feat_map_no in deconvolution}) == 8
    for image, layer_name, feat_map_no in deconvolution:
        assert (image.dtype, image.shape, layer_name) == (np.uint8, (28, 28, 1), "max_pooling2d")
        assert isinstance(feat_map_no, int) and 0 <= feat_map_no < 32

    deep = storage.read_latest(run_dir, "deep_visualization.pickle")
    assert [(layer_name, unit) for _, layer_name, unit, _ in deep] == [
        ("dense_2", unit) for unit in range(10)]
    for image, _, _, loss_value in deep:
        assert (image.dtype, image.shape) == (np.uint8, (28, 28, 1))
        assert isinstance(loss_value, float)

    # 6000 samples / 128 = 47 batches, interval 47 // 5 = 9: stage 0 + floor(47 / 9) = 6.
    for file_name in TECHNIQUE_FILES:
        entries = storage.read_history_index(run_dir, file_name)[0]
        assert [e["step"] for e in entries] == [0, 9, 18, 27, 36, 45]
        snapshot = storage.read_snapshot(run_dir, file_name, entries[-1])
        assert sorted(snapshot["images"]) == IMAGES
    newest = storage.list_images(run_dir)[-1]
    np.testing.assert_array_equal(
        storage.read_latest(run_dir, "saliency_maps.pickle", newest), saliency)
    inputs = storage.read_input_images(run_dir)
    assert sorted(inputs) == IMAGES
    assert all((a.dtype, a.shape) == (np.uint8, (28, 28, 1)) for a in inputs.values())

    with open(storage.results_path(run_dir, "training_progress.txt")) as f:
        rows = [[float(v) for v in line.split()] for line in f]
    assert len(rows) == 47 and all(len(row) == 3 for row in rows)
    assert rows[0][0] == 0.0 and rows[-1][0] == pytest.approx(46 / 47)
    with open(storage.results_path(run_dir, "training_progress_val.txt")) as f:
        [val_row] = [line.split() for line in f]
    assert val_row[0] == "1" and 0 <= float(val_row[1]) <= 1

    model = keras.saving.load_model(os.path.join(run_dir, "networks", "mnist_digits.keras"))
    assert model.predict(inputs[newest][np.newaxis] / 255.0, verbose=0).shape == (1, 10)


def test_functional_skip_example_writes_every_result_file(tmp_path):
    run_dir, _ = run_example(tmp_path, "functional_skip.py")
    for file_name in TECHNIQUE_FILES + ("input_images.pickle",):
        assert storage.read_latest(run_dir, file_name) is not None, file_name
    names = [name for name, _ in storage.read_latest(run_dir, "layer_activations.pickle")]
    assert "Layer 3: add" in names and "Layer 6: concatenate" in names
    deep = storage.read_latest(run_dir, "deep_visualization.pickle")
    assert [(layer_name, unit) for _, layer_name, unit, _ in deep] == [
        ("softmax", unit) for unit in range(10)]
    for table in ("training_progress.txt", "training_progress_val.txt",
                  "training_progress.tsv", "training_progress_val.tsv"):
        assert os.path.getsize(storage.results_path(run_dir, table)) > 0, table
    keras.saving.load_model(os.path.join(run_dir, "networks", "functional_skip.keras"))


def test_sequence_example_gives_curves_over_time(tmp_path):
    run_dir, _ = run_without_images(tmp_path, "sequence_conv1d.py")
    techniques = read_techniques(run_dir)
    assert {key: entry["state"] for key, entry in techniques.items()} == dict.fromkeys(
        techniques, "active")
    names = ["input_0", "input_1", "input_2"]
    saliency = storage.read_latest(run_dir, "saliency_maps.pickle", "input_2")
    assert saliency["gradient"].shape == saliency["input"].shape == (64, 2)
    activations = dict(storage.read_latest(run_dir, "layer_activations.pickle", "input_0"))
    assert activations["Layer 0: conv1d"].shape == (8, 60)  # filters x time
    for reconstruction, layer_name, _ in storage.read_latest(run_dir, "deconvolutional_network.pickle"):
        assert (reconstruction.dtype, reconstruction.shape, layer_name) == (np.float32, (64, 2), "conv1d_1")
    deep = storage.read_latest(run_dir, "deep_visualization.pickle")
    assert [(synthetic.shape, unit) for synthetic, _, unit, _ in deep] == [((64, 2), u) for u in range(3)]
    inputs = storage.safe_load(run_dir, storage.results_path(run_dir, storage.VISUALIZATION_INPUTS_FILE))
    assert sorted(inputs) == names


def test_tabular_example_names_its_features_and_says_why_deconvolution_is_off(tmp_path):
    run_dir, output = run_without_images(tmp_path, "tabular_features.py")
    assert "[visualizer] deconvolutional network switched off when training began: needs " \
           "feature maps" in output
    techniques = read_techniques(run_dir)
    assert techniques["deconvolutional_network"]["state"] == "switched_off"
    assert techniques["saliency_maps"]["state"] == "active"
    saliency = storage.read_latest(run_dir, "saliency_maps.pickle", "input_3")
    assert saliency["feature_names"][:2] == ["age", "income"]
    assert saliency["gradient"].shape == saliency["input"].shape == (6,)
    deep = storage.read_latest(run_dir, "deep_visualization.pickle")
    assert [(synthetic.shape, unit) for synthetic, _, unit, _ in deep] == [((6,), 0), ((6,), 1)]


def run_without_images(tmp_path, script):
    """Copy an example that needs no images to ``tmp_path`` and run it there."""
    shutil.copy(os.path.join(EXAMPLES, script), tmp_path)
    env = dict(os.environ, EPOCHS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(storage.RUN_DIR_ENV, None)
    completed = subprocess.run([sys.executable, script], cwd=tmp_path, env=env, timeout=300,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert "Validation loss" in completed.stdout
    return str(tmp_path), completed.stdout


def read_techniques(run_dir):
    with open(storage.results_path(run_dir, storage.TECHNIQUES_FILE)) as f:
        return json.load(f)


def test_attribution_example_writes_every_method_and_grad_cam_explains_the_true_digit(tmp_path):
    from custom_keras import registry

    run_dir, _ = run_example(tmp_path, "attribution_methods.py")
    techniques = read_techniques(run_dir)
    for technique in registry.ATTRIBUTION_TECHNIQUES:
        assert techniques[technique.key]["state"] == "active", techniques[technique.key]
        entries = storage.read_history_index(run_dir, technique.results_file)[0]
        snapshot = storage.read_snapshot(run_dir, technique.results_file, entries[-1])
        assert sorted(snapshot["images"]) == IMAGES
        for name in IMAGES:
            assert snapshot["images"][name]["method"] == technique.key
            assert snapshot["images"][name]["map"].shape[:2] == (28, 28)
            info = snapshot["info"][name]
            assert info["class_names"][3] == "three"
            if technique.key == "grad_cam":  # the example gives the true digits
                assert (info["class_source"], info["class_index"]) == (
                    "label", {"digit_0.png": 0, "digit_3.png": 3, "digit_5_rgb.png": 5,
                              "digit_7.png": 7}[name])
