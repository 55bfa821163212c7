"""Benchmarks of the health checks and of the bounded history.

1. Health checks on the reference network, one 60,000-image epoch (``--quick``:
   12,000): the time inside their hooks against the epoch (target <= 3 %), and
   the whole epoch with them against one without, which also holds what they do
   inside the training step (gradient norms and dead units every ``interval``
   steps). Measured at the example's interval (5 measurements an epoch) and at
   an interval of 10 batches. As the whole-epoch ratio drowns in the noise of a
   shared machine, one measurement is also timed against one training step.
2. Bounded history: bytes on disk of a technique's history after 5,000
   snapshots against after 300, with the default ``history_limit`` (target <=
   1.1). Each synthetic snapshot is 49 KB, the layer activations of the
   reference network for one image.

Every figure is a ratio of two measurements taken side by side in this one
process. Run with ``.venv/bin/python -m benchmarks.health [--quick]``.
"""
import argparse
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.techniques import (BATCH_SIZE, EPOCH_IMAGES, SNAPSHOTS_PER_EPOCH,  # noqa: E402
                                   HookTimer, batches_of, fit_one_epoch, report)
from custom_keras import storage  # noqa: E402
from custom_keras.callbacks import HealthChecks  # noqa: E402
from custom_keras.reference import build_reference_model, load_digits_28  # noqa: E402
from custom_keras.techniques import health  # noqa: E402

SNAPSHOT_BYTES = 49 * 1024
TECHNIQUE_FILE = "layer_activations.pickle"


def health_check_overhead(samples, rounds):
    """Item 1: epochs without and with the health checks, alternating; the best counts."""
    x, y = load_digits_28(size=samples, shift=2)
    batches = int(np.ceil(samples / BATCH_SIZE))
    run_dir = tempfile.mkdtemp(prefix="bench-health-")
    warm_up = BATCH_SIZE + (samples % BATCH_SIZE or BATCH_SIZE)
    intervals = (int(np.ceil(batches / SNAPSHOTS_PER_EPOCH)), 10)
    # One model each, so the plain one never carries the probe; both traced before timing.
    models = {}
    for name in (None,) + intervals:
        keras.utils.set_random_seed(0)
        models[name] = build_reference_model()
        fit_one_epoch(models[name], batches_of(x[:warm_up], y[:warm_up]),
                      [HealthChecks(run_dir, interval=name)] if name else [])
    data = batches_of(x, y)
    plain, checked, timers = [], {i: [] for i in intervals}, {i: [] for i in intervals}
    for _ in range(rounds):
        plain.append(fit_one_epoch(models[None], data, []))
        for interval in intervals:
            timer = HookTimer()
            timers[interval].append(timer)
            checked[interval].append(fit_one_epoch(
                models[interval], data, timer.wrap([HealthChecks(run_dir, interval=interval)])))
    print("epoch of %d images, batch %d (%d batches), best of %d:" % (
        samples, BATCH_SIZE, batches, rounds))
    for interval in intervals:
        least = min(timer.seconds for timer in timers[interval])
        epoch = min(checked[interval])
        ratio = report("health checks every %d batches: time inside their hooks / epoch"
                       % interval, least, epoch, 0.03)
        print("  = %.2f %% of the epoch" % (100 * ratio), flush=True)
        report("  epoch with the health checks / epoch without", epoch, min(plain))
    alerts = storage.results_path(run_dir, storage.ALERTS_FILE)
    print("  alerts raised: %d" % (sum(1 for _ in open(alerts)) if os.path.exists(alerts) else 0))
    shutil.rmtree(run_dir)


def measurement_cost(rounds=3, batches=60):
    """Item 1, inside the training step: epochs of ``batches`` steps of one model with its
    probe measuring at every step and with the probe off, alternating; the best counts.
    The difference is what one measurement costs against one training step; divided by the
    interval it is the share of an epoch, which the whole-epoch ratio is too noisy to show."""
    x, y = load_digits_28(size=batches * BATCH_SIZE, shift=2)
    model = build_reference_model()
    run_dir = tempfile.mkdtemp(prefix="bench-health-")
    data = batches_of(x, y)
    fit_one_epoch(model, data, [HealthChecks(run_dir, interval=1)])  # builds and traces
    probe = health.HealthProbe.of(model)
    every_step, off = [], []
    for _ in range(rounds):
        probe.start(1, 0)
        every_step.append(fit_one_epoch(model, data, []))
        probe.enabled.assign(False)
        off.append(fit_one_epoch(model, data, []))
    step = min(off) / batches
    measurement = max(min(every_step) - min(off), 0.0) / batches
    print("training step of %d images, best of %d epochs of %d steps:" % (BATCH_SIZE, rounds,
                                                                         batches))
    ratio = report("one measurement (32 samples) / one training step", measurement, step)
    for interval in (int(np.ceil(EPOCH_IMAGES / BATCH_SIZE / SNAPSHOTS_PER_EPOCH)), 10):
        print("  every %d batches: %.2f %% of an epoch" % (interval, 100 * ratio / interval))
    shutil.rmtree(run_dir)


def history_bytes():
    """Item 2: disk usage of one technique's history after 300 and after 5,000 snapshots."""
    run_dir = tempfile.mkdtemp(prefix="bench-history-")
    rng = np.random.default_rng(0)
    result = rng.integers(0, 256, SNAPSHOT_BYTES, dtype=np.uint8)  # incompressible, as stored
    kept, sizes = [], {}
    for stage in range(5000):
        storage.write_snapshot(run_dir, TECHNIQUE_FILE, {"digit.png": result}, "digit.png",
                               {"stage": stage, "epoch": stage // 470, "batch": stage % 470,
                                "step": stage * 10, "progress": stage / 47})
        kept = storage.thin_history(run_dir, TECHNIQUE_FILE, kept + [stage], storage.HISTORY_LIMIT)
        if stage + 1 in (300, 5000):
            sizes[stage + 1] = storage.disk_usage(storage.history_dir(run_dir, TECHNIQUE_FILE))
    index = os.path.join(storage.history_dir(run_dir, TECHNIQUE_FILE), storage.HISTORY_INDEX)
    print("history of %d KB snapshots, history_limit %d: %d kept after 5,000, index %d KB" % (
        SNAPSHOT_BYTES // 1024, storage.HISTORY_LIMIT, len(kept), os.path.getsize(index) // 1024))
    ratio = sizes[5000] / sizes[300]
    print("%-62s %9.1f MB / %9.1f MB = %6.2f  target <= 1.1: %s" % (
        "history bytes after 5,000 snapshots / after 300", sizes[5000] / 2 ** 20,
        sizes[300] / 2 ** 20, ratio, "met" if ratio <= 1.1 else "NOT met"), flush=True)
    shutil.rmtree(run_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="an epoch of 12,000 images instead of 60,000")
    parser.add_argument("--rounds", type=int, default=1,
                        help="epochs of each kind, alternating; the best counts (default 1)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    history_bytes()
    measurement_cost()
    health_check_overhead(12000 if args.quick else EPOCH_IMAGES, args.rounds)


if __name__ == "__main__":
    main()
