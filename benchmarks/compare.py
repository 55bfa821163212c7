"""Benchmark of the comparison dashboards against the one-run dashboards (issue 14, item 2).

Four run folders, each with ``SNAPSHOTS`` saliency snapshots and ``ROWS``
training-progress rows, are compared, in the Bokeh server's process without a
browser:

- one idle poll (nothing new written) of the four-run comparisons against one
  poll of one run's dashboard: what a comparison that stays open costs the server;
- one move of the shared stage slider (four panels drawn) against one move of
  one run's slider;
- one new snapshot in every run, read and shown by the comparison that follows
  the newest, against the same for one run.

Ratios near the number of runs (4) mean the comparison costs what four separate
dashboards would. Run with ``.venv/bin/python -m benchmarks.compare``.
"""
import os
import statistics
import tempfile
import time

import numpy as np

from custom_bokeh import compare, saliency_maps
from custom_bokeh.dashboard import ImageDashboard
from custom_bokeh.training_progress import TrainingProgressDashboard
from custom_keras import registry, storage

RUNS = 4
SNAPSHOTS = 300
ROWS = 10_000
REPEATS = 30
SALIENCY = registry.get("saliency_maps")


def write_run(run_dir, seed):
    rng = np.random.default_rng(seed)
    storage.write_input_images(run_dir, {"digit.png": rng.integers(0, 255, (28, 28, 1), np.uint8)})
    for stage in range(SNAPSHOTS):
        write_snapshot(run_dir, stage, rng)
    storage.append_rows(storage.results_path(run_dir, storage.TRAINING_PROGRESS_TABLE),
                        ["progress", "epoch", "batch", "loss", "accuracy"],
                        [[i / 100, i // 100, i % 100, 1 / (i + 1), i / ROWS] for i in range(ROWS)])


def write_snapshot(run_dir, stage, rng):
    storage.write_snapshot(run_dir, SALIENCY.results_file,
                           {"digit.png": rng.integers(0, 255, (28, 28, 1), np.uint8)}, "digit.png",
                           {"stage": stage, "epoch": stage // 50, "batch": stage % 50 * 10,
                            "step": stage * 10}, {"digit.png": {"predicted_class": 3,
                                                                "confidence": 0.5}})


def median_s(action, repeats=REPEATS):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    with tempfile.TemporaryDirectory() as storage_dir:
        runs = []
        for number in range(RUNS):
            run_dir = os.path.join(storage_dir, "3", "run_%d" % number)
            os.makedirs(run_dir)
            write_run(run_dir, number)
            runs.append((run_dir, "run %d" % number))
        one_images = ImageDashboard(runs[0][0], SALIENCY, saliency_maps.render)
        many_images = compare.CompareImages(runs, SALIENCY, saliency_maps.render)
        one_curves = TrainingProgressDashboard(runs[0][0])
        many_curves = compare.CompareCurves(runs)

        print("%d runs of %d snapshots and %d rows each; medians of %d" % (
            RUNS, SNAPSHOTS, ROWS, REPEATS))
        for name, one, many in (("images", one_images, many_images),
                                ("curves", one_curves, many_curves)):
            one_s, many_s = median_s(one.update), median_s(many.update)
            print("idle poll, %s: one run %.2f ms, comparison %.2f ms, ratio %.2f" % (
                name, 1e3 * one_s, 1e3 * many_s, many_s / one_s))

        positions = iter(range(10 ** 6))

        def move_one():
            one_images.slider.value = next(positions) % SNAPSHOTS

        def move_many():
            many_images.slider.value = next(positions) % len(many_images.steps)

        one_s, many_s = median_s(move_one), median_s(move_many)
        print("slider move: one run %.2f ms, comparison %.2f ms, ratio %.2f" % (
            1e3 * one_s, 1e3 * many_s, many_s / one_s))

        one_images.slider.value = one_images.slider.end
        one_images.follow_latest = True
        many_images.slider.value = many_images.slider.end
        rng = np.random.default_rng(9)
        stages = iter(range(SNAPSHOTS, SNAPSHOTS + 10 * REPEATS))

        def new_snapshot_one():
            write_snapshot(runs[0][0], next(stages), rng)
            one_images.update()

        def new_snapshot_many():
            stage = next(stages)
            for run_dir, _ in runs:
                write_snapshot(run_dir, stage, rng)
            many_images.update()

        one_s, many_s = median_s(new_snapshot_one), median_s(new_snapshot_many)
        print("new snapshot in every run, written and shown: one run %.2f ms, comparison %.2f ms,"
              " ratio %.2f" % (1e3 * one_s, 1e3 * many_s, many_s / one_s))


if __name__ == "__main__":
    main()
