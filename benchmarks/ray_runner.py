"""Benchmarks of runs as Ray jobs (issue 15) against local runs, side by side in one process.

A local Ray head (token authentication, as the tests start it) is started for the
benchmark and stopped afterwards. Both runners run sandboxed, with cgroups.

- first output: from ``start`` (what pressing Run calls) to the script's first
  line in output.txt (read every 5 ms), one run each way per round, alternating; the fastest of
  ``--rounds`` (the least disturbed by other load on a shared machine), and the
  first round alone (a cold start).
- training time: ``scripts/examples/mnist_digits.py`` (2 epochs, all callbacks)
  once each way, from ``start`` until the runner reports 'finished'; target <= 1.1.

Both runners are polled by their monitor thread every 0.5 s, as in the web app (a
Ray poll is a request to the cluster: polling faster would load the head).

Run with ``.venv/bin/python -m benchmarks.ray_runner [--rounds N] [--no-training]``.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.sandbox import EXAMPLE, EXAMPLE_IMAGES, report
from custom_keras import storage
from tests.ray_head import RayHead
from visualizer.ray_runner import RayRunner
from visualizer.runner import LocalRunner
from visualizer.sandbox import Cgroups, Sandbox

FIRST_LINE = "import time\nprint('first line', flush=True)\ntime.sleep(1)\n"
TRAINING_TARGET = 1.1
TIMEOUT_S = 300
MONITOR_INTERVAL_S = 0.5  # as the web app's monitor


class Watched:
    """A runner watched as the web app watches it: its monitor thread polls it every
    MONITOR_INTERVAL_S (a Ray poll is a request to the cluster), and ``ended`` tells when a
    run ended.

    Args:
        runner: a ``LocalRunner`` or ``RayRunner`` (its ``on_update`` is taken over).
    """

    def __init__(self, runner):
        self.runner = runner
        self._ended = {}
        self._changed = threading.Condition()
        runner.on_update = self._record
        runner.start_monitor(MONITOR_INTERVAL_S)

    def _record(self, update):
        if update.state in ("finished", "failed", "stopped"):
            with self._changed:
                self._ended[update.run_id] = update
                self._changed.notify_all()

    def wait_ended(self, run_id, run_dir):
        """Waits until run ``run_id`` ended; raises unless it finished."""
        with self._changed:
            if not self._changed.wait_for(lambda: run_id in self._ended, TIMEOUT_S):
                raise RuntimeError("run %d did not end within %d s" % (run_id, TIMEOUT_S))
        update = self._ended[run_id]
        if update.state != "finished":
            with open(storage.output_path(run_dir), errors="replace") as f:
                raise RuntimeError("run %d ended %s: %s\n%s" % (run_id, update.state,
                                                                 update.message, f.read()[-2000:]))


def new_run_folder(storage_dir, name, source=None, source_file=None):
    run_dir = os.path.join(storage_dir, name)
    os.makedirs(run_dir)
    if source_file:
        shutil.copyfile(source_file, os.path.join(run_dir, "script.py"))
        shutil.copytree(EXAMPLE_IMAGES, os.path.join(run_dir, "images"))
    else:
        with open(os.path.join(run_dir, "script.py"), "w") as f:
            f.write(source)
    return run_dir


def first_output_s(watched, run_id, storage_dir):
    """Seconds from ``start`` to the script's first line in output.txt; then waits for its end."""
    run_dir = new_run_folder(storage_dir, "first-%d" % run_id, FIRST_LINE)
    output = storage.output_path(run_dir)
    started = time.perf_counter()
    watched.runner.start(run_id, run_dir, "script.py")
    while True:
        try:
            with open(output) as f:
                if f.readline().endswith("\n"):
                    break
        except FileNotFoundError:
            pass
        if time.perf_counter() - started > TIMEOUT_S:
            raise RuntimeError("no output from run %d after %d s" % (run_id, TIMEOUT_S))
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    watched.wait_ended(run_id, run_dir)
    return elapsed


def training_s(watched, run_id, storage_dir):
    """Seconds from ``start`` of the example to its run being reported 'finished'."""
    run_dir = new_run_folder(storage_dir, "mnist-%d" % run_id, source_file=EXAMPLE)
    started = time.perf_counter()
    watched.runner.start(run_id, run_dir, "script.py")
    watched.wait_ended(run_id, run_dir)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs each way for the first-output figure (default 3)")
    parser.add_argument("--no-training", action="store_true",
                        help="skip the training-time figure (it trains the example twice)")
    args = parser.parse_args()
    storage_dir = tempfile.mkdtemp(prefix="visualizer-ray-benchmark-")
    head = RayHead().start()
    os.environ.update(head.client_env)
    try:
        sandbox = Sandbox(storage_dir)
        local = Watched(LocalRunner(sandbox=sandbox, cgroups=Cgroups.detect(storage_dir)))
        ray = Watched(RayRunner(head.address, storage_dir, sandbox=sandbox))
        ray_s, local_s = [], []
        for n in range(args.rounds):
            ray_s.append(first_output_s(ray, 2 * n, storage_dir))
            local_s.append(first_output_s(local, 2 * n + 1, storage_dir))
        report("first output line: Ray / local (first run)", ray_s[0], local_s[0])
        report("first output line: Ray / local (best of %d)" % args.rounds, min(ray_s),
               min(local_s))
        if not args.no_training:
            # The first import of TensorFlow reads its libraries from disk: not in either figure.
            subprocess.run([sys.executable, "-c", "import keras"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            training_ray = training_s(ray, 1000, storage_dir)
            training_local = training_s(local, 1001, storage_dir)
            report("example training (2 epochs): Ray / local", training_ray, training_local,
                   TRAINING_TARGET)
        ray.runner.shutdown()
        local.runner.shutdown()
    finally:
        head.stop()
        shutil.rmtree(storage_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
