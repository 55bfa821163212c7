"""Benchmarks of the sandbox around every run (issue 10).

Both figures come from runs through ``LocalRunner``, the way the web app starts
them (wrapper, cgroups, limits), once with the sandbox and once without, side by
side in this one process:

- start-up cost per run: a script that only prints, run ``--starts`` times each
  way, alternating; the fastest time from ``start`` to 'finished' (the least
  disturbed by other load on a shared machine). The wrapper's own Python
  start-up is in both; the difference is what bubblewrap, the namespaces and the
  uid switch add.
- training time: ``scripts/examples/mnist_digits.py`` (2 epochs, all callbacks)
  once each way, from ``start`` to 'finished', after an untimed import of keras
  that puts TensorFlow's libraries in the page cache; target <= 1.05.

Run with ``.venv/bin/python -m benchmarks.sandbox [--starts N] [--no-training]``.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from visualizer.runner import LocalRunner
from visualizer.sandbox import Cgroups, Sandbox

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO_ROOT, "scripts", "examples", "mnist_digits.py")
EXAMPLE_IMAGES = os.path.join(REPO_ROOT, "scripts", "examples", "images")
TRIVIAL = "print('started')\n"
TRAINING_TARGET = 1.05


def timed_run(runner, run_id, storage_dir, name, source=None, source_file=None):
    """Seconds from ``runner.start`` to 'finished' of one run in a fresh run folder."""
    run_dir = os.path.join(storage_dir, "%s-%d" % (name, run_id))
    os.makedirs(run_dir)
    script = os.path.join(run_dir, name + ".py")
    if source_file:
        shutil.copyfile(source_file, script)
        shutil.copytree(EXAMPLE_IMAGES, os.path.join(run_dir, "images"))
    else:
        with open(script, "w") as f:
            f.write(source)
    started = time.perf_counter()
    runner.start(run_id, run_dir, script)
    while True:
        for update in runner.poll():
            if update.run_id == run_id and update.state in ("finished", "failed", "stopped"):
                if update.state != "finished":
                    with open(os.path.join(run_dir, "output.txt"), errors="replace") as f:
                        raise RuntimeError("%s ended %s: %s\n%s" % (
                            name, update.state, update.message, f.read()[-2000:]))
                return time.perf_counter() - started
        time.sleep(0.01)


def report(name, value, baseline, target=None):
    """Prints ``value / baseline`` with both timings and the target; returns the ratio."""
    ratio = value / baseline
    verdict = "" if target is None else "  target <= %g: %s" % (
        target, "met" if ratio <= target else "NOT met")
    print("%-62s %9.1f ms / %9.1f ms = %6.2f%s" % (name, value * 1e3, baseline * 1e3, ratio,
                                                   verdict), flush=True)
    return ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10,
                        help="trivial runs each way for the start-up cost (default 10)")
    parser.add_argument("--no-training", action="store_true",
                        help="skip the training-time figure (it trains the example twice)")
    args = parser.parse_args()
    storage_dir = tempfile.mkdtemp(prefix="visualizer-sandbox-benchmark-")
    try:
        cgroups = Cgroups.detect(storage_dir)
        sandboxed = LocalRunner(sandbox=Sandbox(storage_dir), cgroups=cgroups)
        plain = LocalRunner(sandbox=None, cgroups=cgroups)
        sandbox_s, plain_s = [], []
        for n in range(args.starts):
            sandbox_s.append(timed_run(sandboxed, 2 * n, storage_dir, "trivial", TRIVIAL))
            plain_s.append(timed_run(plain, 2 * n + 1, storage_dir, "trivial", TRIVIAL))
        sandbox_start, plain_start = min(sandbox_s), min(plain_s)
        report("start-up of a run: sandboxed / not sandboxed (best of %d)" % args.starts,
               sandbox_start, plain_start)
        print("%-62s %9.1f ms" % ("sandbox start-up cost per run", (sandbox_start - plain_start)
                                  * 1e3), flush=True)
        if not args.no_training:
            # The first import of TensorFlow reads its libraries from disk: not in either figure.
            subprocess.run([sys.executable, "-c", "import keras"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            training_sandboxed = timed_run(sandboxed, 1000, storage_dir, "mnist_digits",
                                           source_file=EXAMPLE)
            training_plain = timed_run(plain, 1001, storage_dir, "mnist_digits",
                                       source_file=EXAMPLE)
            report("example training (2 epochs): sandboxed / not sandboxed", training_sandboxed,
                   training_plain, TRAINING_TARGET)
        sandboxed.shutdown()
        plain.shutdown()
    finally:
        shutil.rmtree(storage_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
