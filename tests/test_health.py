"""Health checks raise their alert on broken trainings and none on healthy ones; bounded history."""
import json
import math
import os

import keras
import numpy as np
import pytest

from custom_keras import storage
from custom_keras.callbacks import CustomCallbacks, HealthChecks
from custom_keras.techniques import health
from test_examples import run_example  # (tf-keras-vis installs a package named "tests")

DEFAULTS = health.Thresholds()


def read_alerts(run_dir):
    path = storage.results_path(run_dir, storage.ALERTS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def kinds(run_dir):
    return {alert["kind"] for alert in read_alerts(run_dir)}


def mlp(hidden, activation="relu", inputs=8, outputs=1, **dense):
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(units, activation=activation, **dense) for units in hidden]
    layers.append(keras.layers.Dense(outputs, activation="sigmoid"))
    return keras.Sequential(layers)


def separable_data(samples, seed=0, inputs=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, inputs)).astype("float32")
    return x, (x[:, :1] + x[:, 1:2] > 0).astype("float32")


def train(run_dir, model, optimizer, x, y, epochs, batch_size=32, validation_data=None,
          interval=2):
    keras.utils.set_random_seed(0)
    model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0,
              validation_data=validation_data,
              callbacks=[HealthChecks(str(run_dir), interval=interval)])
    return str(run_dir)


# --- broken trainings raise their alert, healthy ones none ------------------------------


def test_a_healthy_training_raises_no_alert(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = separable_data(512)
    model = mlp([16, 16])
    run_dir = train(tmp_path, model, keras.optimizers.Adam(1e-2), x, y, epochs=4,
                    validation_data=separable_data(128, seed=1))
    assert read_alerts(run_dir) == []
    with open(storage.results_path(run_dir, storage.GRADIENT_NORMS_TABLE)) as f:
        header, first = f.readline().split(), f.readline().split()
    assert header == ["step", "epoch", "batch"] + [layer.name for layer in model.layers]
    assert first[:3] == ["0", "0", "0"] and all(float(n) > 0 for n in first[3:])


def test_a_learning_rate_of_10_raises_exploding_gradients_then_nan_loss(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = separable_data(512)
    x *= 10
    run_dir = train(tmp_path, mlp([64, 64, 64]), keras.optimizers.SGD(10.0), x, y, epochs=3)
    alerts = read_alerts(run_dir)
    order = [alert["kind"] for alert in alerts]
    assert health.EXPLODING_GRADIENTS in order and health.NAN_LOSS in order
    assert order.index(health.EXPLODING_GRADIENTS) < order.index(health.NAN_LOSS)
    nan = alerts[order.index(health.NAN_LOSS)]
    assert "loss" in nan["message"] and nan["advice"] == health.ADVICE[health.NAN_LOSS]
    # written once, not at every batch while the loss stays NaN
    assert order.count(health.NAN_LOSS) == 1


def test_a_20_layer_sigmoid_network_raises_vanishing_gradients(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = separable_data(256)
    model = mlp([16] * 20, activation="sigmoid")
    run_dir = train(tmp_path, model, keras.optimizers.SGD(0.01), x, y, epochs=1)
    alerts = [a for a in read_alerts(run_dir) if a["kind"] == health.VANISHING_GRADIENTS]
    assert len(alerts) == 1
    assert alerts[0]["value"] < DEFAULTS.vanishing_ratio
    assert "first layer (%s)" % model.layers[0].name in alerts[0]["message"]


def test_relu_layers_with_a_large_negative_bias_raise_dead_units_for_each_layer(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = separable_data(256)
    model = mlp([32, 32], bias_initializer=keras.initializers.Constant(-10.0))
    run_dir = train(tmp_path, model, keras.optimizers.Adam(1e-3), x, y, epochs=1)
    dead = [a for a in read_alerts(run_dir) if a["kind"] == health.DEAD_UNITS]
    assert sorted(a["layer"] for a in dead) == [layer.name for layer in model.layers[:2]]
    assert all(a["value"] == 1.0 for a in dead)


def test_64_samples_for_60_epochs_raise_overfitting(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = separable_data(64)
    y[::3] = 1 - y[::3]  # noisy labels: learned by heart, not generalised
    run_dir = train(tmp_path, mlp([256, 256]), keras.optimizers.Adam(1e-2), x, y, epochs=60,
                    batch_size=16, validation_data=separable_data(256, seed=1), interval=4)
    assert health.OVERFITTING in kinds(run_dir)
    alert = next(a for a in read_alerts(run_dir) if a["kind"] == health.OVERFITTING)
    assert alert["batch"] == 4 and alert["step"] == 4 * (alert["epoch"] + 1)


def test_a_learning_rate_of_1e_7_raises_loss_not_decreasing_from_the_second_epoch(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = separable_data(512)
    run_dir = train(tmp_path, mlp([16, 16]), keras.optimizers.SGD(1e-7), x, y, epochs=3)
    flat = [a for a in read_alerts(run_dir) if a["kind"] == health.LOSS_NOT_DECREASING]
    assert len(flat) == 1 and flat[0]["epoch"] == 1


def test_the_reference_example_at_its_normal_settings_raises_no_alert(tmp_path):
    run_dir, _ = run_example(tmp_path, "mnist_digits.py", epochs=2)
    assert read_alerts(run_dir) == []
    assert os.path.getsize(storage.results_path(run_dir, storage.GRADIENT_NORMS_TABLE)) > 0
    with open(storage.results_path(run_dir, storage.TECHNIQUES_FILE)) as f:
        entry = json.load(f)["health_checks"]
    assert entry["state"] == storage.TECHNIQUE_ACTIVE and entry["reason"] is None


def test_the_functional_example_raises_no_alert(tmp_path):
    run_dir, _ = run_example(tmp_path, "functional_skip.py", epochs=2)
    assert read_alerts(run_dir) == []
    assert os.path.getsize(storage.results_path(run_dir, storage.DEAD_UNITS_TABLE)) > 0


# --- the checks never stop the training --------------------------------------------------


def test_an_error_inside_the_checks_switches_them_off_and_training_goes_on(tmp_path, monkeypatch,
                                                                          capsys):
    def broken(*args):
        raise RuntimeError("broken rule")
    monkeypatch.setattr(health, "vanishing_gradients", broken)
    x, y = separable_data(128)
    model = mlp([8])
    run_dir = train(tmp_path, model, "adam", x, y, epochs=2)
    assert model.optimizer.iterations.numpy() == 8  # every batch trained
    with open(storage.results_path(run_dir, storage.TECHNIQUES_FILE)) as f:
        entry = json.load(f)["health_checks"]
    assert entry["state"] == storage.TECHNIQUE_SWITCHED_OFF
    assert entry["reason"] == "RuntimeError: broken rule"
    assert "health checks switched off" in capsys.readouterr().err


def test_a_training_step_the_probe_cannot_trace_trains_without_it_and_says_why(tmp_path,
                                                                              monkeypatch):
    def untraceable(self, data):
        raise NotImplementedError("cannot trace this step")
    monkeypatch.setattr(health.HealthProbe, "_measure_when_due", untraceable)
    x, y = separable_data(64)
    model = mlp([4])
    run_dir = train(tmp_path, model, keras.optimizers.SGD(1e-7), x, y, epochs=3)
    assert model.optimizer.iterations.numpy() == 6
    with open(storage.results_path(run_dir, storage.TECHNIQUES_FILE)) as f:
        entry = json.load(f)["health_checks"]
    assert entry["state"] == storage.TECHNIQUE_ACTIVE
    assert entry["reason"] == ("without gradient norms and dead units: "
                               "NotImplementedError: cannot trace this step")
    assert kinds(run_dir) == {health.LOSS_NOT_DECREASING}  # the other checks go on


def test_later_fits_with_new_health_checks_reuse_the_traced_training_step(tmp_path):
    x, y = separable_data(64)
    model = mlp([4])
    train(tmp_path / "first", model, "adam", x, y, epochs=1)
    traced = model.train_function
    model.fit(x, y, batch_size=32, epochs=2, verbose=0,
              callbacks=[HealthChecks(str(tmp_path / "second"), interval=2)])
    assert model.train_function is traced
    with open(storage.results_path(str(tmp_path / "second"), storage.GRADIENT_NORMS_TABLE)) as f:
        assert [line.split()[0] for line in f][1:] == ["0", "2"]


def test_a_model_with_two_outputs_gets_the_checks_without_gradients_and_says_why(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(1)(inputs)])
    model.compile(keras.optimizers.SGD(1e30), loss=["mse", "mse"])
    x = np.ones((64, 4), "float32") * 1e10
    model.fit(x, [x[:, :1], x[:, :1]], epochs=1, verbose=0,
              callbacks=[HealthChecks(str(tmp_path), interval=1)])
    with open(storage.results_path(str(tmp_path), storage.TECHNIQUES_FILE)) as f:
        entry = json.load(f)["health_checks"]
    assert entry["state"] == storage.TECHNIQUE_ACTIVE
    assert "one output" in entry["reason"]
    assert health.NAN_LOSS in kinds(str(tmp_path))


def test_register_training_progress_adds_the_health_checks_unless_told_not_to(tmp_path):
    with_checks = CustomCallbacks(str(tmp_path), base_interval=7)
    with_checks.register_training_progress()
    with_checks.register_health_checks(interval=3, dead_fraction=0.9)
    checks = [c for c in with_checks.get_list() if isinstance(c, HealthChecks)]
    assert len(checks) == 1 and checks[0].interval == 3
    assert checks[0].thresholds.dead_fraction == 0.9
    without = CustomCallbacks(str(tmp_path))
    without.register_training_progress(health_checks=False)
    assert not any(isinstance(c, HealthChecks) for c in without.get_list())


def test_a_wrong_threshold_is_refused_at_registration_with_its_name(tmp_path):
    with pytest.raises(ValueError, match="dead_fraction"):
        HealthChecks(str(tmp_path), dead_fraction=2)
    with pytest.raises(TypeError):
        HealthChecks(str(tmp_path), exploding_limit=5)


# --- the pure rules --------------------------------------------------------------------


def test_nan_and_inf_in_any_scalar_value_are_found_by_name():
    logs = {"loss": 0.5, "accuracy": float("nan"), "val_loss": np.float32("inf"), "x": [1, 2]}
    assert health.nonfinite_metrics(logs) == ["accuracy", "val_loss"]
    assert health.nonfinite_metrics({"loss": 0.1}) == []


def test_a_batch_loss_is_recovered_from_the_running_averages():
    losses = [4.0, 2.0, 3.0]
    averages = np.cumsum(losses) / np.arange(1, 4)
    assert health.batch_loss(averages[0], None, 1) == 4.0
    assert health.batch_loss(averages[2], averages[1], 3) == pytest.approx(3.0)


def test_smoothing_starts_at_the_first_value_and_follows_a_step_slowly():
    smoothed = health.smooth([1.0] * 5 + [0.0] * 5, weight=0.5)
    assert smoothed[0] == pytest.approx(1.0) and smoothed[4] == pytest.approx(1.0)
    assert 0 < smoothed[5] < 1 and smoothed[9] < smoothed[5]


def test_exploding_gradients_by_size_or_by_growth_within_the_epoch():
    assert health.exploding_gradients([1.0, 2e3], None, DEFAULTS) == (True, 2e3)
    assert health.exploding_gradients([1.0, 5.0], 0.4, DEFAULTS) == (True, 5.0)
    assert health.exploding_gradients([1.0, 3.0], 0.4, DEFAULTS) == (False, 3.0)
    active, largest = health.exploding_gradients([float("nan")], 1.0, DEFAULTS)
    assert not active and math.isnan(largest)  # NaN is nan_loss's alert


def test_vanishing_gradients_needs_both_a_small_ratio_and_a_small_first_norm():
    assert health.vanishing_gradients([1e-6, 1.0, 1.0], DEFAULTS)[0]
    assert not health.vanishing_gradients([1e-3, 1e3], DEFAULTS)[0]  # ratio small, norm not
    assert not health.vanishing_gradients([1e-5, 1e-3], DEFAULTS)[0]  # norm small, ratio not
    assert not health.vanishing_gradients([1e-9], DEFAULTS)[0]  # one layer: no ratio


def test_dead_layers_are_those_at_or_above_the_threshold():
    assert health.dead_layers({"a": 0.5, "b": 0.49, "c": 1.0}, DEFAULTS) == {"a": 0.5, "c": 1.0}


def test_overfitting_needs_validation_rising_while_training_falls_two_epochs_in_a_row():
    assert health.overfitting([3, 2, 1], [1, 2, 3], DEFAULTS)
    assert not health.overfitting([3, 2, 1], [1, 2, 2], DEFAULTS)
    assert not health.overfitting([3, 2, 2.5], [1, 2, 3], DEFAULTS)
    assert not health.overfitting([2, 1], [1, 2], DEFAULTS)


def test_loss_not_decreasing_looks_at_the_last_30_percent_from_the_second_epoch():
    flat = [1.0] * 100
    falling = list(np.linspace(1.0, 0.5, 100))
    assert health.loss_not_decreasing(flat, 2, DEFAULTS)
    assert not health.loss_not_decreasing(flat, 1, DEFAULTS)
    assert not health.loss_not_decreasing(falling, 2, DEFAULTS)
    # an improvement smaller than plateau_min_delta is no improvement
    assert health.loss_not_decreasing([1.0] * 70 + [0.999] * 30, 2, DEFAULTS)


def test_an_alert_is_written_once_again_after_clearing_and_a_few_times_an_epoch_at_most():
    gate = health.AlertGate(per_epoch=2)
    key = (health.DEAD_UNITS, "dense")
    assert [gate.update(key, active) for active in (True, True, False, True, False, True)] == [
        True, False, False, True, False, False]
    assert gate.update((health.DEAD_UNITS, "dense_1"), True)  # another layer: its own alert
    gate.new_epoch()
    gate.update(key, False)
    assert gate.update(key, True)


# --- bounded history ----------------------------------------------------------------------


def test_a_bounded_history_keeps_the_limit_stage_0_the_latest_and_every_recent_stage():
    kept = []
    for stage in range(5000):
        kept = storage.stages_to_keep(kept + [stage], 300)
        assert len(kept) <= 300 and kept[0] == 0 and kept[-1] == stage
    assert kept[-150:] == list(range(4850, 5000))


def test_a_bounded_history_spreads_the_older_stages_evenly_over_the_run():
    kept = []
    for stage in range(5000):
        kept = storage.stages_to_keep(kept + [stage], 300)
    older = kept[:-150]
    gaps = set(np.diff(older))
    assert len(gaps) == 1  # one even spacing
    assert older[-1] + gaps.pop() > 4850 - 64  # reaching the recent ones


def test_a_thinned_stage_is_never_wanted_back():
    kept, ever_removed = [], set()
    for stage in range(2000):
        before = set(kept) | {stage}
        kept = storage.stages_to_keep(kept + [stage], 20)
        ever_removed |= before - set(kept)
        assert not ever_removed & set(kept)


def test_a_history_limit_below_2_is_refused(tmp_path):
    with pytest.raises(ValueError, match="history_limit"):
        CustomCallbacks(str(tmp_path), history_limit=1)


def write_snapshots(run_dir, count, limit, kept=()):
    kept = list(kept)
    for stage in range(len(kept) and kept[-1] + 1, count):
        storage.write_snapshot(run_dir, "layer_activations.pickle",
                               {"image.png": np.full(8, stage, np.uint8)}, "image.png",
                               {"stage": stage, "epoch": 0, "batch": stage, "step": stage})
        kept = storage.thin_history(run_dir, "layer_activations.pickle", kept + [stage], limit)
    return kept


def test_readers_of_a_bounded_history_see_only_kept_snapshots_and_every_file_exists(tmp_path):
    run_dir = str(tmp_path)
    kept = write_snapshots(run_dir, 100, 10)
    entries, offset = storage.read_history_index(run_dir, "layer_activations.pickle")
    assert [e["stage"] for e in entries] == kept and len(kept) <= 10
    for entry in entries:
        snapshot = storage.read_snapshot(run_dir, "layer_activations.pickle", entry)
        assert snapshot["images"]["image.png"][0] == entry["stage"]
    folder = storage.history_dir(run_dir, "layer_activations.pickle")
    assert len([n for n in os.listdir(folder) if n.endswith(".pickle")]) == len(kept)


def test_a_reader_by_offset_learns_which_of_its_entries_were_thinned(tmp_path):
    run_dir = str(tmp_path)
    kept = write_snapshots(run_dir, 12, 10)
    shown, offset = storage.read_history_index(run_dir, "layer_activations.pickle")
    kept = write_snapshots(run_dir, 40, 10, kept)
    added, removed, _ = storage.read_history_changes(run_dir, "layer_activations.pickle", offset)
    shown = [e for e in shown if e["file"] not in removed] + added
    assert [e["stage"] for e in shown] == kept
    # the entry of a snapshot removed after the index was read: a clear FileNotFoundError
    with pytest.raises(FileNotFoundError):
        storage.read_snapshot(run_dir, "layer_activations.pickle", {"file": "000000001.pickle"})


def test_the_callbacks_keep_a_bounded_history_with_stage_0_and_the_latest(tmp_path):
    run_dir = str(tmp_path)
    x, y = separable_data(64)
    callbacks = CustomCallbacks(run_dir, base_interval=1, history_limit=4,
                                visualization_inputs=x[:1])
    callbacks.register_layer_activations()
    model = mlp([4])
    model.compile("adam", "binary_crossentropy")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks.get_list())
    stages = [e["stage"] for e in storage.read_history_index(run_dir,
                                                             "layer_activations.pickle")[0]]
    assert len(stages) <= 4 and stages[0] == 0 and stages[-1] == 16


def test_a_model_compiled_with_xla_and_several_steps_per_execution_is_measured(tmp_path):
    x, y = separable_data(256)
    model = mlp([16], bias_initializer=keras.initializers.Constant(-10.0))
    model.compile(keras.optimizers.SGD(0.1), "binary_crossentropy", jit_compile=True,
                  steps_per_execution=3)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0,
              callbacks=[HealthChecks(str(tmp_path), interval=2)])
    with open(storage.results_path(str(tmp_path), storage.GRADIENT_NORMS_TABLE)) as f:
        rows = [line.split() for line in f][1:]
    assert len(rows) >= 4 and all(row[3] == "0.0" for row in rows)  # a dead first layer
    assert health.DEAD_UNITS in kinds(str(tmp_path))
