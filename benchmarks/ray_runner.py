"""Benchmarks of runs as Ray jobs (issue 15) against local runs, side by side in one process.

A local Ray head (token authentication, as the tests start it) is started for the
benchmark and stopped afterwards. Both runners run sandboxed, with cgroups.

- first output: from ``start`` (what pressing Run calls) to the script's first
  line in output.txt, one run each way per round, alternating; the fastest of
  ``--rounds`` (the least disturbed by other load on a shared machine), and the
  first round alone (a cold start).
- training time: ``scripts/examples/mnist_digits.py`` (2 epochs, all callbacks)
  once each way, from ``start`` until the runner reports 'finished'; target <= 1.1.

Run with ``.venv/bin/python -m benchmarks.ray_runner [--rounds N] [--no-training]``.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.sandbox import EXAMPLE, report, timed_run
from custom_keras import storage
from tests.ray_head import RayHead
from visualizer.ray_runner import RayRunner
from visualizer.runner import LocalRunner
from visualizer.sandbox import Cgroups, Sandbox

FIRST_LINE = "import time\nprint('first line', flush=True)\ntime.sleep(1)\n"
TRAINING_TARGET = 1.1
TIMEOUT_S = 300


def first_output_s(runner, run_id, storage_dir, name):
    """Seconds from ``runner.start`` to the first line in output.txt; then waits for the end."""
    run_dir = os.path.join(storage_dir, "%s-%d" % (name, run_id))
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "first.py"), "w") as f:
        f.write(FIRST_LINE)
    output = storage.output_path(run_dir)
    started = time.perf_counter()
    runner.start(run_id, run_dir, "first.py")
    while True:
        try:
            with open(output) as f:
                if f.readline().endswith("\n"):
                    break
        except FileNotFoundError:
            pass
        if time.perf_counter() - started > TIMEOUT_S:
            raise RuntimeError("no output from %s after %d s" % (name, TIMEOUT_S))
        runner.poll()
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    while not any(u.run_id == run_id and u.state in ("finished", "failed", "stopped")
                  for u in runner.poll()):
        time.sleep(0.05)
    return elapsed


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
        local = LocalRunner(sandbox=sandbox, cgroups=Cgroups.detect(storage_dir))
        ray = RayRunner(head.address, storage_dir, sandbox=sandbox)
        ray_s, local_s = [], []
        for n in range(args.rounds):
            ray_s.append(first_output_s(ray, 2 * n, storage_dir, "first"))
            local_s.append(first_output_s(local, 2 * n + 1, storage_dir, "first"))
        report("first output line: Ray / local (first run)", ray_s[0], local_s[0])
        report("first output line: Ray / local (best of %d)" % args.rounds, min(ray_s),
               min(local_s))
        if not args.no_training:
            # The first import of TensorFlow reads its libraries from disk: not in either figure.
            subprocess.run([sys.executable, "-c", "import keras"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            training_ray = timed_run(ray, 1000, storage_dir, "mnist_digits", source_file=EXAMPLE)
            training_local = timed_run(local, 1001, storage_dir, "mnist_digits",
                                       source_file=EXAMPLE)
            report("example training (2 epochs): Ray / local", training_ray, training_local,
                   TRAINING_TARGET)
        ray.shutdown()
        local.shutdown()
    finally:
        head.stop()
        shutil.rmtree(storage_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
