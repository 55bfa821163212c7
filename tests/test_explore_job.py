"""The exploration job (custom_keras.explore), called in-process on a folder: loading and its
clear messages, input conversion, the architecture against the model's own graph, predictions,
layer activations and statistics, and the requests it answers through files."""
import base64
import json
import os
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from custom_keras import explore, registry, storage  # noqa: E402
from custom_keras.reference import build_reference_model  # noqa: E402

EXAMPLE_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "scripts", "examples", "images")


def make_folder(tmp_path, model, images=None, array=None, class_names=None):
    """An exploration folder as the server writes it: the model, inputs, class names."""
    folder = tmp_path / "explore@1"
    folder.mkdir()
    model.save(str(folder / storage.EXPLORE_MODEL_FILE))
    if array is not None:
        np.save(folder / storage.EXPLORE_INPUTS_FILE, array)
    else:
        (folder / "images").mkdir()
        for index, (name, image) in enumerate((images or {}).items()):
            image.save(folder / "images" / name)
            os.utime(folder / "images" / name, ns=(index, index))
    if class_names is not None:
        (folder / storage.EXPLORE_CLASS_NAMES_FILE).write_text(json.dumps(class_names))
    return str(folder)


def digit(name="digit_3.png"):
    return Image.open(os.path.join(EXAMPLE_IMAGES, name))


@pytest.fixture(scope="module")
def reference_model():
    # Layer names (the graph's node ids) count up over the whole process: from a clear
    # session they are the ones a fresh job sees (conv2d, conv2d_1, ..., dense_1).
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    return build_reference_model()


def failure_of(folder):
    with pytest.raises(explore.ExploreError) as error:
        explore.Explorer.load(folder)
    return str(error.value)


# --- bad input: one clear line each -------------------------------------------------------------

def test_a_file_that_is_not_a_keras_archive_is_refused_with_a_clear_message(tmp_path,
                                                                             reference_model):
    folder = make_folder(tmp_path, reference_model, {"a.png": digit()})
    with open(os.path.join(folder, storage.EXPLORE_MODEL_FILE), "wb") as f:
        f.write(b"print('not a model')\n")
    assert failure_of(folder).startswith("The model file is not a Keras model file")


def test_a_damaged_archive_says_it_could_not_be_loaded_and_how_to_fix_it(tmp_path,
                                                                        reference_model):
    folder = make_folder(tmp_path, reference_model, {"a.png": digit()})
    path = os.path.join(folder, storage.EXPLORE_MODEL_FILE)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["model.weights.h5"] = members["model.weights.h5"][:100]  # truncated weights
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    message = failure_of(folder)
    assert message.startswith("The model file could not be loaded (")
    assert "Save it again with model.save('name.keras')" in message


def test_an_unknown_custom_layer_is_named_with_how_to_provide_it(tmp_path):
    @keras.saving.register_keras_serializable(package="lab")
    class Doubling(keras.layers.Layer):
        def call(self, x):
            return x * 2

    inputs = keras.Input((28, 28, 1))
    model = keras.Model(inputs, Doubling()(keras.layers.Flatten()(inputs)))
    folder = make_folder(tmp_path, model, {"a.png": digit()})
    del keras.saving.get_custom_objects()["lab>Doubling"]
    message = failure_of(folder)
    assert "custom class Doubling (registered as lab>Doubling)" in message
    assert "cannot be loaded here" in message
    assert "@keras.saving.register_keras_serializable" in message


def test_a_lambda_layer_is_not_loaded_and_the_message_says_why(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    folder = make_folder(tmp_path, model, array=np.zeros((1, 4), np.float32))
    assert "Lambda layer with Python code, which is never loaded here" in failure_of(folder)


def test_images_of_the_wrong_size_and_channels_are_converted_and_said_so(tmp_path,
                                                                         reference_model):
    colour = Image.new("RGB", (56, 40), (255, 0, 0))
    folder = make_folder(tmp_path, reference_model, {"grey.png": digit("digit_3.png"),
                                                     "red.png": colour})
    explorer = explore.Explorer.load(folder)
    assert explorer.inputs.shape == (2, 28, 28, 1) and explorer.names == ["grey.png", "red.png"]
    assert explorer.notices == ["red.png: converted from colour (RGB) to grey, as the model "
                                "takes 1 channel; resized from 56x40 to 28x28 pixels."]
    # pure red is 0.299 * 255 = 76 in grey, scaled to 0..1
    assert np.allclose(explorer.inputs[1], 76 / 255)


def test_a_grey_image_for_a_colour_model_is_converted_to_rgb_and_said_so(tmp_path):
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(
        keras.layers.Flatten()(inputs)))
    folder = make_folder(tmp_path, model, {"g.png": Image.new("L", (8, 8), 51)})
    explorer = explore.Explorer.load(folder)
    assert explorer.inputs.shape == (1, 8, 8, 3) and np.allclose(explorer.inputs, 0.2)
    assert explorer.notices == ["g.png: converted from grey to colour (RGB), as the model takes "
                                "3 channels."]


def test_an_array_of_the_wrong_shape_is_refused_with_both_shapes(tmp_path, reference_model):
    folder = make_folder(tmp_path, reference_model, array=np.zeros((2, 28, 27), np.float32))
    assert failure_of(folder) == (
        "The array has shape (2, 28, 27), but the model takes samples of shape (28, 28, 1): give "
        "an array of shape (N, 28, 28, 1) or one sample.")


def test_one_sample_without_the_batch_axis_is_taken_as_one_input(tmp_path, reference_model):
    folder = make_folder(tmp_path, reference_model, array=np.ones((28, 28, 1), np.float64))
    explorer = explore.Explorer.load(folder)
    assert explorer.inputs.shape == (1, 28, 28, 1) and explorer.names == ["sample 1"]


def test_a_class_name_list_of_the_wrong_length_is_refused(tmp_path, reference_model):
    folder = make_folder(tmp_path, reference_model, {"a.png": digit()},
                         class_names=["cat", "dog"])
    assert failure_of(folder) == ("2 class names were given, but the model has 10 outputs: give "
                                  "one name per output, in order, or none to see class numbers.")


def test_main_writes_the_failure_for_the_page_and_exits_non_zero(tmp_path, reference_model):
    folder = make_folder(tmp_path, reference_model, {"a.png": digit()}, class_names=["x"])
    with pytest.raises(SystemExit) as exit_info:
        explore.main(folder)
    assert exit_info.value.code == 1
    assert storage.read_json(folder, storage.results_path(
        folder, storage.EXPLORE_FAILURE_FILE))["message"].startswith("1 class names were given")
    assert not os.path.exists(storage.results_path(folder, storage.EXPLORE_READY_FILE))


# --- the architecture against the model's own graph -------------------------------------------

def config_edges(model, prefix=""):
    """(source, target) pairs from the model's get_config() inbound_nodes, nested ones too."""
    edges = set()

    def histories(value):
        if isinstance(value, dict):
            if value.get("class_name") == "__keras_tensor__":
                yield value["config"]["keras_history"][0]
            for item in value.values():
                yield from histories(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from histories(item)

    for layer_config in model.get_config()["layers"]:
        target = prefix + layer_config["name"]
        for source in histories(layer_config.get("inbound_nodes", [])):
            edges.add((prefix + source, target))
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            edges |= config_edges(layer, prefix + layer.name + "/")
    return edges


def residual_model():
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv_b")(y)
    x = keras.layers.Add(name="skip")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="out")(x))


def test_the_architecture_of_a_residual_network_has_its_skip_connection(tmp_path):
    model = residual_model()
    graph = explore.architecture(model)
    ids = [node["id"] for node in graph["nodes"]]
    assert ids == ["image", "stem", "conv_a", "conv_b", "skip", "pool", "out"]
    edges = {(e["source"], e["target"]) for e in graph["edges"]}
    assert edges == config_edges(model)
    assert ("stem", "skip") in edges and ("conv_b", "skip") in edges
    by_id = {node["id"]: node for node in graph["nodes"]}
    assert by_id["skip"]["kind"] == "merge" and by_id["stem"]["kind"] == "conv"
    assert by_id["stem"]["output_shape"] == "(None, 16, 16, 8)"
    assert by_id["stem"]["params"] == 3 * 3 * 3 * 8 + 8 and by_id["stem"]["has_filters"]
    assert by_id["stem"]["config"]["filters"] == 8
    assert by_id["pool"]["has_maps"] is False and by_id["conv_a"]["has_maps"] is True
    assert {e["shape"] for e in graph["edges"] if e["target"] == "skip"} == {"(None, 16, 16, 8)"}
    assert graph["total_params"] == model.count_params()


def nested_model():
    inner_inputs = keras.Input((8, 8, 1), name="inner_in")
    inner = keras.Model(inner_inputs, keras.layers.MaxPooling2D(name="inner_pool")(
        keras.layers.Conv2D(4, 3, activation="relu", name="inner_conv")(inner_inputs)),
        name="features")
    inputs = keras.Input((8, 8, 1), name="outer_in")
    x = keras.layers.Flatten(name="flat")(inner(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))


def test_the_architecture_of_a_nested_model_has_the_model_node_and_its_inner_layers(tmp_path):
    model = nested_model()
    graph = explore.architecture(model)
    by_id = {node["id"]: node for node in graph["nodes"]}
    assert set(by_id) == {"outer_in", "features", "features/inner_in", "features/inner_conv",
                          "features/inner_pool", "flat", "head"}
    assert by_id["features"]["is_model"] and by_id["features"]["kind"] == "model"
    assert by_id["features"]["params"] == 3 * 3 * 4 + 4
    assert [by_id[i]["parent"] for i in ("features/inner_in", "features/inner_conv",
                                         "features/inner_pool")] == ["features"] * 3
    assert by_id["head"]["parent"] is None
    assert {(e["source"], e["target"]) for e in graph["edges"]} == config_edges(model)


def test_a_saved_and_loaded_sequential_model_gets_its_chain_of_layers(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"),
                              keras.layers.Dense(2, name="b")])
    model.save(tmp_path / "s.keras")
    graph = explore.architecture(keras.saving.load_model(tmp_path / "s.keras"))
    names = [node["id"] for node in graph["nodes"]]
    assert names[1:] == ["a", "b"] and graph["nodes"][0]["kind"] == "input"
    assert [(e["source"], e["target"]) for e in graph["edges"]] == [(names[0], "a"), ("a", "b")]


# --- predictions and layers ---------------------------------------------------------------------

def test_predictions_are_the_top_five_sorted_with_class_names_summing_at_most_one(
        tmp_path, reference_model):
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    folder = make_folder(tmp_path, reference_model, {"a.png": digit(), "b.png": digit(
        "digit_7.png")}, class_names=names)
    explorer = explore.Explorer.load(folder)
    explorer.analyse()
    result = storage.read_json(folder, storage.results_path(folder, "predictions.json"))
    assert [entry["name"] for entry in result["images"]] == ["a.png", "b.png"]
    for entry, probabilities in zip(result["images"], reference_model.predict(
            explorer.inputs, verbose=0)):
        top = entry["top"]
        assert len(top) == 5
        values = [t["probability"] for t in top]
        assert values == sorted(values, reverse=True) and sum(values) <= 1 + 1e-6
        assert [t["class_index"] for t in top] == list(np.argsort(-probabilities)[:5])
        assert all(t["class_name"] == names[t["class_index"]] for t in top)
        assert np.allclose(values, probabilities[[t["class_index"] for t in top]], atol=1e-6)


def test_scores_that_are_not_probabilities_get_a_softmax_and_a_notice(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.layers[1].set_weights([np.eye(3, dtype=np.float32), np.zeros(3, np.float32)])
    folder = make_folder(tmp_path, model, array=np.array([[1.0, 2.0, 3.0]], np.float32))
    explorer = explore.Explorer.load(folder)
    explorer.analyse()
    top = storage.read_json(folder, storage.results_path(
        folder, "predictions.json"))["images"][0]["top"]
    expected = np.exp([3.0, 2.0, 1.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    assert [t["class_index"] for t in top] == [2, 1, 0]
    assert np.allclose([t["probability"] for t in top], expected)
    assert "a softmax was applied" in " ".join(explorer.notices)


def known_conv_model():
    """Input 4x4x1 -> Conv2D 2 filters 2x2, no bias, ReLU: filter 0 sums its window, filter 1
    sums it negated (so is 0 for non-negative inputs)."""
    inputs = keras.Input((4, 4, 1))
    conv = keras.layers.Conv2D(2, 2, use_bias=False, activation="relu", name="conv")
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="out")(
        keras.layers.Flatten()(conv(inputs))))
    kernel = np.zeros((2, 2, 1, 2), np.float32)
    kernel[..., 0], kernel[..., 1] = 1.0, -1.0
    conv.set_weights([kernel])
    return model


@pytest.mark.parametrize("keep_outputs_bytes", [explore.KEEP_OUTPUTS_BYTES, 0],
                         ids=["outputs kept", "computed on request"])
def test_a_layer_has_its_maps_range_and_per_filter_statistics_over_all_inputs(
        tmp_path, monkeypatch, keep_outputs_bytes):
    monkeypatch.setattr(explore, "KEEP_OUTPUTS_BYTES", keep_outputs_bytes)
    monkeypatch.setattr(explore, "FIRST_PASS_BATCH", 1)  # statistics summed over batches
    first = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    second = np.zeros((4, 4, 1), np.float32)
    folder = make_folder(tmp_path, known_conv_model(), array=np.stack([first, second]))
    explorer = explore.Explorer.load(folder)
    explorer.analyse()
    explorer.layer("conv", "sample 1")
    result = storage.read_json(folder, storage.layer_path(folder, "conv", "sample 1"))
    # By hand: filter 0's window sums of 0..15 in 4 columns: top-left 0+1+4+5 = 10, each step
    # right adds 2*... = +4, each step down +16.
    sums = np.array([[10, 14, 18], [26, 30, 34], [42, 46, 50]], dtype=np.float64)
    assert result["node"] == "conv" and result["image"] == "sample 1"
    assert result["shape"] == [2, 3, 3] and result["range"] == [0.0, 50.0]
    maps = np.frombuffer(base64.b64decode(result["activations"]), np.uint8).reshape(2, 3, 3)
    assert maps[0].tolist() == np.round(sums / 50 * 255).astype(int).tolist()
    assert maps[1].tolist() == [[0] * 3] * 3
    # over both inputs (the second all zeros): filter 0 mean = mean(sums) / 2, zeros 9 of 18
    assert result["stats"] == [
        {"index": 0, "mean": pytest.approx(sums.mean() / 2), "zero_fraction": 0.5},
        {"index": 1, "mean": 0.0, "zero_fraction": 1.0}]
    filters = result["filters"]
    assert filters["shape"] == [2, 2, 2, 1] and filters["rgb"] is False
    weights = np.frombuffer(base64.b64decode(filters["data"]), np.uint8).reshape(2, 2, 2, 1)
    assert weights.min() == weights.max()  # a constant filter: one grey


def test_first_layer_filters_on_a_colour_input_are_marked_colour(tmp_path):
    folder = make_folder(tmp_path, residual_model(), {"a.png": Image.new("RGB", (16, 16))})
    explorer = explore.Explorer.load(folder)
    explorer.analyse()
    assert explorer.layer("stem", "a.png")["filters"]["rgb"] is True
    assert explorer.layer("conv_a", "a.png")["filters"]["rgb"] is False


def test_dense_layers_have_one_value_per_unit_and_inner_layers_of_nested_models_too(tmp_path):
    folder = make_folder(tmp_path, nested_model(), array=np.ones((1, 8, 8, 1), np.float32))
    explorer = explore.Explorer.load(folder)
    explorer.analyse()
    assert explorer.layer("head", "sample 1")["shape"] == [3]
    inner = explorer.layer("features/inner_conv", "sample 1")
    expected = keras.Model(explorer.model.layers[1].inputs,
                           explorer.model.layers[1].get_layer("inner_conv").output)(
        explorer.inputs).numpy()
    assert inner["shape"] == [4, 6, 6]
    assert inner["range"] == pytest.approx([float(expected.min()), float(expected.max())])


# --- requests through files ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_explorer(tmp_path_factory, reference_model):
    folder = make_folder(tmp_path_factory.mktemp("reference"), reference_model,
                         {"three.png": digit("digit_3.png"), "seven.png": digit("digit_7.png")})
    explorer = explore.Explorer.load(folder)
    explorer.analyse()
    return explorer


@pytest.mark.parametrize("technique,node,caption", [
    ("deconvolution", "conv2d_1", "map 5 of conv2d_1"),
    ("grad_cam", "conv2d_1", "at conv2d_1"),
    ("deep_visualization", "dense_1", "unit 5 of dense_1"),
])
def test_a_compute_request_writes_a_picture_and_the_technique_s_explanation(
        reference_explorer, technique, node, caption):
    response = reference_explorer.compute("a" * 32, technique, node, "three.png", 5)
    assert response["state"] == "done" and response["message"] is None
    (result,) = response["results"]
    assert result["key"] == technique and caption in result["caption"]
    explanation = registry.get(explore.REGISTRY_KEYS.get(technique, technique)).explanation
    assert (result["what"], result["how"], result["misleads"]) == (
        explanation.shows, explanation.reading, explanation.misleads)
    folder = reference_explorer.folder
    with Image.open(storage.compute_path(folder, result["image"])) as picture:
        assert picture.size == (28, 28)
    assert storage.read_json(folder, storage.compute_path(folder, "a" * 32 + ".json")) == response


def test_all_techniques_for_one_image_come_side_by_side(reference_explorer):
    response = reference_explorer.compute("b" * 32, "all", "conv2d_1", "seven.png", None)
    keys = [result["key"] for result in response["results"]]
    assert keys == ["saliency", "deconvolution", "deep_visualization"] + list(
        explore.ATTRIBUTION_METHODS)
    assert all(result["image"] for result in response["results"]), response


def test_a_technique_that_cannot_handle_the_layer_fails_with_its_reason(reference_explorer):
    response = reference_explorer.compute("c" * 32, "deconvolution", "dense", "three.png", 0)
    assert response["state"] == "failed" and response["message"].startswith("Deconvolutional network: ")


def test_the_job_answers_requests_written_into_its_folder_and_exits_when_idle(tmp_path,
                                                                              reference_model):
    folder = make_folder(tmp_path, reference_model, {"three.png": digit()})
    explorer = explore.Explorer.load(folder)
    explorer.analyse()
    storage.write_request(folder, "r1", {"kind": "layer", "node": "dense", "image": "three.png"})
    storage.write_request(folder, "d" * 32, {"kind": "compute", "technique": "grad_cam",
                                              "node": None, "image": "three.png", "unit": None})
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    explorer.serve(idle_s=5, clock=lambda: now[0], sleep=sleep)
    assert storage.read_json(folder, storage.layer_path(folder, "dense", "three.png"))[
        "shape"] == [128]
    assert storage.read_json(folder, storage.compute_path(folder, "d" * 32 + ".json"))[
        "state"] == "done"
    # idle time went on only after the last request, and every layer was precomputed meanwhile
    assert 5 < now[0] < 6
    assert len(os.listdir(storage.results_path(folder, storage.EXPLORE_LAYERS_DIR))) == len(
        explorer.stats)


def test_the_first_layer_of_a_nested_base_model_shows_colour_filters(tmp_path):
    base = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, name="b1"),
                             keras.layers.Conv2D(4, 3, name="b2")], name="base")
    inputs = keras.Input((16, 16, 3))
    outputs = keras.layers.Dense(2, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(base(inputs)))
    folder = make_folder(tmp_path, keras.Model(inputs, outputs),
                         {"a.png": Image.new("RGB", (16, 16))})
    explorer = explore.Explorer.load(folder)
    explorer.analyse()
    assert explorer.layer("base/b1", "a.png")["filters"]["rgb"] is True
    assert explorer.layer("base/b2", "a.png")["filters"]["rgb"] is False


def test_layers_no_one_asked_for_are_written_only_up_to_the_precompute_budget(
        tmp_path, reference_model, monkeypatch):
    monkeypatch.setattr(explore, "PRECOMPUTE_BYTES", 1)  # one file, then only on request
    folder = make_folder(tmp_path, reference_model, {"three.png": digit()})
    explorer = explore.Explorer.load(folder)
    explorer.analyse()
    explorer.serve(idle_s=0, clock=iter(range(100)).__next__, sleep=lambda seconds: None)
    written = os.listdir(storage.results_path(folder, storage.EXPLORE_LAYERS_DIR))
    assert written == [storage.layer_file_name("input_layer", "three.png")]
