"""Benchmarks of the callbacks and techniques on the reference network.

Every figure is a ratio of two timings taken side by side in this one process,
so it means something on a shared, noisy machine. The techniques are timed as
the callbacks use them: objects built once when training begins
(``SaliencyModel``, ``DeconvolutionModel``, ``ActivationModel``,
``DeepVisualizationModel``), warmed up, then called. Run with
``.venv/bin/python -m benchmarks.techniques [--quick]``.
"""
import argparse
import collections
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from custom_keras import registry  # noqa: E402
from custom_keras.callbacks import CustomCallbacks  # noqa: E402
from custom_keras.reference import build_reference_model, load_digits_28  # noqa: E402
from custom_keras.techniques.activations import EXCLUDE_LAYERS, ActivationModel  # noqa: E402
from custom_keras.techniques.deconvolution import DeconvolutionModel  # noqa: E402
from custom_keras.techniques.deep_visualization import DeepVisualizationModel  # noqa: E402
from custom_keras.techniques.saliency import SaliencyModel  # noqa: E402

BATCH_SIZE = 128
EPOCH_IMAGES = 60000
SNAPSHOTS_PER_EPOCH = 5
DEEP_VIS = dict(learning_rate=200, no_of_iterations=50, l2_decay=0.0001, blur_interval=4, blur_std=1.0)
DEEP_VIS_UNITS = [(8, unit) for unit in range(64)]  # the 64 units of the Dense 64 layer
DECONV_LAYER = 2  # the second Conv2D: 32 feature maps
HOOKS = ("on_train_begin", "on_epoch_begin", "on_train_batch_begin", "on_train_batch_end",
         "on_epoch_end", "on_train_end")


def best_of(function, repeats):
    """The fastest of ``repeats`` calls, in seconds (the least disturbed by other load).

    Args:
        function: called without arguments.
        repeats: number of calls (>= 1).
    """
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def report(name, value, baseline, target=None, higher_is_better=False):
    """Prints one figure as ``value / baseline`` (or its inverse) with its target; returns the ratio.

    Args:
        name: what is compared, "A / B".
        value: seconds of A.
        baseline: seconds of B.
        target: the ratio to meet, or None.
        higher_is_better: the figure is ``baseline / value`` ("B is N times slower") and must
            reach ``target``; else it is ``value / baseline`` and must stay at most ``target``.
    """
    ratio = baseline / value if higher_is_better else value / baseline
    verdict = ""
    if target is not None:
        met = ratio >= target if higher_is_better else ratio <= target
        verdict = "  target %s %g: %s" % (">=" if higher_is_better else "<=", target,
                                          "met" if met else "NOT met")
    print("%-62s %9.1f ms / %9.1f ms = %6.2f%s" % (
        name, (baseline if higher_is_better else value) * 1e3,
        (value if higher_is_better else baseline) * 1e3, ratio, verdict), flush=True)
    return ratio


class HookTimer:
    """Adds up the time spent inside the hooks that callbacks override, per callback class.

    The epoch ratio is noisy on a shared machine; the time inside the hooks is
    not, and tells how much of a difference the callbacks themselves make.
    """

    def __init__(self):
        self.by_callback = collections.Counter()

    @property
    def seconds(self):
        return sum(self.by_callback.values())

    def wrap(self, callbacks):
        """Times every hook of ``callbacks`` that its class overrides; returns ``callbacks``."""
        for callback in callbacks:
            for name in HOOKS:
                if getattr(type(callback), name) is not getattr(keras.callbacks.Callback, name):
                    setattr(callback, name, self._timed(type(callback).__name__, getattr(callback, name)))
        return callbacks

    def _timed(self, callback_name, hook):
        def timed_hook(*args, **kwargs):
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.by_callback[callback_name] += time.perf_counter() - start
        return timed_hook


def batches_of(x, y):
    """A tf.data pipeline of (x, y) in batches of BATCH_SIZE, built once for every epoch.

    Given numpy arrays, every ``fit`` call would convert the whole data set again:
    seconds that vary with the machine's load and are not training.
    """
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH_SIZE).prefetch(2)


def fit_one_epoch(model, data, callbacks):
    start = time.perf_counter()
    model.fit(data, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def _run_folder(image):
    run_dir = tempfile.mkdtemp(prefix="bench-run-")
    os.makedirs(os.path.join(run_dir, "images"))
    Image.fromarray((image[:, :, 0] * 255).astype(np.uint8)).save(os.path.join(run_dir, "images", "digit.png"))
    return run_dir


def training_overhead(samples, rounds=1):
    """Item 1: one epoch with the five visualizing callbacks (5 snapshots), with the eight
    attribution callbacks, and with TensorBoard.

    Args:
        samples: images per epoch.
        rounds: epochs of each kind; the best counts. The kinds alternate, so a slow
            phase of the shared machine hits all of them alike. The time inside the
            hooks, printed beside the epoch ratio, hardly depends on the machine's load.
    """
    x, y = load_digits_28(size=samples, shift=2)
    batches = int(np.ceil(samples / BATCH_SIZE))
    run_dir = _run_folder(x[0])
    model = build_reference_model()
    # Warm-up: traces the training step for a full and for the epoch's smaller last batch.
    warm_up = BATCH_SIZE + (samples % BATCH_SIZE or BATCH_SIZE)
    fit_one_epoch(model, batches_of(x[:warm_up], y[:warm_up]), [])
    data = batches_of(x, y)

    def visualizer_callbacks():
        # Stage 0 before the first batch, then every interval batches: 5 snapshots in the epoch.
        callbacks = CustomCallbacks(run_dir, base_interval=int(np.ceil(batches / SNAPSHOTS_PER_EPOCH)))
        callbacks.register_training_progress()
        callbacks.register_layer_activations()
        callbacks.register_saliency_maps()
        callbacks.register_deconvolutional_network(3, feat_map_amount=8)
        callbacks.register_deep_visualization([(9, unit) for unit in range(10)], **DEEP_VIS)
        return callbacks.get_list()

    def attribution_callbacks():
        # The eight attribution methods with their defaults, declared in the registry.
        callbacks = CustomCallbacks(run_dir, base_interval=int(np.ceil(batches / SNAPSHOTS_PER_EPOCH)))
        for technique in registry.ATTRIBUTION_TECHNIQUES:
            getattr(callbacks, "register_" + technique.key)()
        return callbacks.get_list()

    def tensorboard_callbacks():
        return [keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), histogram_freq=1,
                                            update_freq="batch")]

    plain, visualized, attributed, tensorboard, hook_timers = [], [], [], [], []
    for _ in range(rounds):
        plain.append(fit_one_epoch(model, data, []))
        hook_timers.append(HookTimer())
        visualized.append(fit_one_epoch(model, data, hook_timers[-1].wrap(visualizer_callbacks())))
        attributed.append(fit_one_epoch(model, data, attribution_callbacks()))
        tensorboard.append(fit_one_epoch(model, data, tensorboard_callbacks()))
    least = min(hook_timers, key=lambda timer: timer.seconds)
    print("epoch of %d images, batch %d (%d batches), best of %d:" % (samples, BATCH_SIZE, batches, rounds))
    report("all five visualizing callbacks, %d snapshots / no callbacks" % SNAPSHOTS_PER_EPOCH,
           min(visualized), min(plain), 1.15)
    report("  (no callbacks + time inside their hooks) / no callbacks",
           min(plain) + least.seconds, min(plain))
    print("  time inside the hooks: " + ", ".join(
        "%s %.2f s" % item for item in least.by_callback.most_common()), flush=True)
    report("the eight attribution callbacks (defaults), %d snapshots / no callbacks"
           % SNAPSHOTS_PER_EPOCH, min(attributed), min(plain))
    report("Keras TensorBoard (batch scalars, histograms) / no callbacks", min(tensorboard), min(plain))
    shutil.rmtree(run_dir)


def trained_model():
    x, y = load_digits_28()
    model = build_reference_model()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return model, x[:1]


def forward_backward_floor(model):
    """One compiled forward and backward pass of ``model`` on one image: the floor.

    Compiled like the techniques' reusable objects, and the score is taken inside
    the tape, so the gradient really flows back to the image.
    """
    @tf.function
    def step(image):
        with tf.GradientTape() as tape:
            tape.watch(image)
            score = model(image, training=False)[:, 0]
        return tape.gradient(score, image)

    def run(image):
        gradient = step(tf.convert_to_tensor(image))
        return gradient.numpy()
    return run


def warmed(function, *args):
    """``function`` bound to ``args`` after one call (tracing, first-call caches)."""
    function(*args)
    return lambda: function(*args)


def techniques(repeats):
    """Items 2-4: saliency, deconvolution, layer activations and deep visualization.

    Args:
        repeats: calls per timing; the best counts.
    """
    model, image = trained_model()
    floor_step = warmed(forward_backward_floor(model), image)
    assert np.any(floor_step() != 0), "the floor's gradient must reach the image"

    def floor():
        return best_of(floor_step, repeats)

    saliency = warmed(SaliencyModel(model), image)
    report("saliency map / one forward+backward pass", best_of(saliency, repeats), floor(), 1.5)
    deconvolution = warmed(DeconvolutionModel(model, DECONV_LAYER, feat_map_amount=32), image)
    report("deconvolution of 32 maps / one forward+backward pass", best_of(deconvolution, repeats),
           floor(), 3.0)

    activations = warmed(ActivationModel(model, EXCLUDE_LAYERS), image)
    per_layer = [keras.Model(model.inputs[0], layer.output)
                 for layer in model.layers if not isinstance(layer, EXCLUDE_LAYERS)]
    one_function_per_layer = warmed(lambda: [m(image, training=False).numpy() for m in per_layer])
    report("layer activations: one multi-output pass / one function per layer",
           best_of(activations, repeats), best_of(one_function_per_layer, repeats))

    # One unit at a time is the same work for every unit, so every 4th unit is timed
    # and the sum scaled to all 64: a minute less on this machine.
    batched = warmed(DeepVisualizationModel(model, DEEP_VIS_UNITS, **DEEP_VIS), 0)
    timed_units = DEEP_VIS_UNITS[::4]
    singles = [warmed(DeepVisualizationModel(model, [unit], **DEEP_VIS), 0) for unit in timed_units]
    one_at_a_time = best_of(lambda: [single() for single in singles], 1) * len(DEEP_VIS_UNITS) / len(timed_units)
    report("deep visualization, 64 units x 50 it.: one batch vs one at a time (%d timed)" % len(timed_units),
           best_of(batched, 2), one_at_a_time, 10, higher_is_better=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="an epoch of 12,000 images instead of 60,000")
    parser.add_argument("--rounds", type=int, default=1,
                        help="epochs of each kind (no callbacks, the visualizing callbacks, "
                             "the attribution callbacks, TensorBoard), alternating; the best counts. One 60,000-image "
                             "round takes about 2.5 minutes on two cores (default 1)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    techniques(repeats=20)
    training_overhead(12000 if args.quick else EPOCH_IMAGES, rounds=args.rounds)


if __name__ == "__main__":
    main()
