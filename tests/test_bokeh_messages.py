"""What a dashboard says when a technique has no results: what is true in this run."""
import numpy as np
import pytest

from custom_bokeh import dashboard, deep_visualization
from custom_bokeh.dashboard import ImageDashboard
from custom_keras import registry, storage

SALIENCY = registry.get("saliency_maps")
TRACEBACK = """Epoch 1/3
Traceback (most recent call last):
  File "/run/script.py", line 40, in <module>
    model.fit(x, y)
ValueError: Input 0 of layer "dense" is incompatible with the layer
"""


def entry(state, **changes):
    return dict({"registered": True, "title": "saliency maps",
                 "results_file": "saliency_maps.pickle", "params": {"interval": 10},
                 "interval": 10, "state": state, "reason": None, "first_snapshot_step": None,
                 "input_kind": None}, **changes)


def message(run_dir, technique=SALIENCY):
    return dashboard.no_data_text(technique, run_dir)


@pytest.fixture
def run_dir(tmp_path):
    storage.write_run_status(str(tmp_path), "running")
    return str(tmp_path)


def test_a_starting_run_that_registered_the_technique_is_waiting_not_told_to_register(run_dir):
    storage.write_techniques(run_dir, {"saliency_maps": entry("registered")})
    assert message(run_dir) == "Registered; the first snapshot is taken when training begins."
    storage.write_techniques(run_dir, {"saliency_maps": entry("active", first_snapshot_step=0)})
    assert message(run_dir) == "Waiting for the first snapshot at batch 0 (then every 10 batches)."


def test_a_sequential_model_without_input_waits_for_batch_1(run_dir):
    storage.write_techniques(run_dir, {"saliency_maps": entry(
        "waiting", first_snapshot_step=1, reason="the model is built by its first batch")})
    assert message(run_dir) == ("Waiting for the first snapshot at batch 1 (then every 10 "
                                "batches).\nthe model is built by its first batch")


def test_a_switched_off_technique_says_why(run_dir):
    storage.write_techniques(run_dir, {"saliency_maps": entry(
        "switched_off", reason="needs an image: this run has none")})
    assert message(run_dir) == ("Switched off for this run: needs an image: this run has none\n"
                                "Training went on without it.")


def test_a_failed_run_names_the_exception_that_ended_it(run_dir):
    storage.write_techniques(run_dir, {"saliency_maps": entry("active", first_snapshot_step=0)})
    with open(storage.output_path(run_dir), "w") as output:
        output.write(TRACEBACK)
    storage.write_run_status(run_dir, "failed", 1, "exited with code 1")
    assert message(run_dir) == (
        "The run failed before the saliency maps produced results: ValueError: Input 0 of layer "
        "\"dense\" is incompatible with the layer")


def test_a_run_that_failed_before_registering_anything_names_the_exception(run_dir):
    with open(storage.output_path(run_dir), "w") as output:
        output.write(TRACEBACK)
    storage.write_run_status(run_dir, "failed", 1, "exited with code 1")
    assert message(run_dir).endswith(": ValueError: Input 0 of layer \"dense\" is incompatible "
                                     "with the layer")


def test_a_failed_run_without_a_traceback_gives_the_runners_message(run_dir):
    storage.write_run_status(run_dir, "failed", None, "wall time limit of 60 s exceeded")
    assert message(run_dir).endswith(": wall time limit of 60 s exceeded")


def test_a_technique_not_registered_gets_a_call_with_this_models_layer_numbers(run_dir):
    storage.write_techniques(run_dir, {"layer_activations": entry("active",
                                                                  input_kind="sequence")})
    activations = registry.get("layer_activations")
    storage.write_snapshot(run_dir, activations.results_file, {"input_0": [
        ("Layer 0: conv1d", np.zeros((8, 60), np.uint8)),
        ("Layer 2: conv1d_1", np.zeros((6, 26), np.uint8)),
        ("Layer 4: dense", np.zeros(3, np.uint8))]}, "input_0",
        {"stage": 0, "epoch": 0, "batch": 0, "step": 0})
    assert message(run_dir, registry.get("deconvolutional_network")).endswith(
        "Add:\ncallbacks.register_deconvolutional_network(2, feat_map_amount=6)")
    assert message(run_dir, registry.get("deep_visualization")).endswith(
        "Add:\ncallbacks.register_deep_visualization([(4, 0), (4, 1)], learning_rate=0.5, "
        "no_of_iterations=30, l2_decay=0.01)")


def test_without_known_layers_the_call_is_the_example(run_dir):
    storage.write_techniques(run_dir, {"training_progress": entry("active")})
    technique = registry.get("deconvolutional_network")
    assert message(run_dir, technique) == (
        "Not registered: this run's script does not register the deconvolutional network. "
        "Add:\n" + technique.register_call)


def test_a_script_still_loading_is_not_told_to_register(run_dir):
    assert message(run_dir).startswith("Waiting for the script to start")


def test_a_stopped_run_says_it_was_stopped(run_dir):
    storage.write_techniques(run_dir, {"saliency_maps": entry("active", first_snapshot_step=0)})
    storage.write_run_status(run_dir, "stopped", None, "stopped by the user")
    assert message(run_dir) == "The run was stopped before the saliency maps produced results."


def test_results_of_a_technique_switched_off_later_carry_the_reason(run_dir):
    result = [(np.ones(3, np.float32), "dense", 0, 1.0)]
    technique = registry.get("deep_visualization")
    storage.write_snapshot(run_dir, technique.results_file, {"input_0": result}, "input_0",
                           {"stage": 0, "epoch": 0, "batch": 0, "step": 0})
    storage.write_techniques(run_dir, {"deep_visualization": entry(
        "switched_off", reason="the loss became NaN at batch 20")})
    shown = ImageDashboard(run_dir, technique, deep_visualization.render, True)
    assert shown.message.visible and shown.message.text == (
        "Switched off for this run: the loss became NaN at batch 20\nTraining went on without "
        "it. The snapshots taken before are shown.")


def test_the_last_traceback_of_the_output_is_found_with_its_line_number(tmp_path):
    run_dir = str(tmp_path)
    with open(storage.output_path(run_dir), "w") as output:
        output.write("noise\n" * 5 + "Traceback (most recent call last):\n  File \"a\"\n"
                     "KeyError: 1\n\nDuring handling...\n" + TRACEBACK + "more output\n")
    assert storage.read_failure(run_dir) == (
        12, "ValueError: Input 0 of layer \"dense\" is incompatible with the layer")


def test_a_run_without_traceback_or_output_has_no_failure(tmp_path):
    assert storage.read_failure(str(tmp_path)) is None
    with open(storage.output_path(str(tmp_path)), "w") as output:
        output.write("Epoch 1/3\n")
    assert storage.read_failure(str(tmp_path)) is None


def test_techniques_json_that_is_not_an_object_reads_as_nothing_registered(tmp_path):
    run_dir = str(tmp_path)
    storage.atomic_write_bytes(storage.results_path(run_dir, storage.TECHNIQUES_FILE), b"[1, 2]")
    assert storage.read_techniques(run_dir) is None
    storage.atomic_write_bytes(storage.results_path(run_dir, storage.TECHNIQUES_FILE),
                               b'{"saliency_maps": 3, "deep_visualization": {"state": "active"}}')
    assert storage.read_techniques(run_dir) == {"deep_visualization": {"state": "active"}}


def test_a_traceback_after_more_output_than_is_counted_has_no_line_number(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MAX_LINE_COUNT_BYTES", 1000)
    monkeypatch.setattr(storage, "MAX_TAIL_BYTES", 500)
    with open(storage.output_path(str(tmp_path)), "w") as output:
        output.write("x" * 99 + "\n" * 2000 + TRACEBACK)
    assert storage.read_failure(str(tmp_path)) == (
        None, "ValueError: Input 0 of layer \"dense\" is incompatible with the layer")
