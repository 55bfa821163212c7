"""Benchmarks of the callbacks and techniques on the reference network.

Every figure is a ratio of two timings taken side by side in this one process,
so it means something on a shared, noisy machine. Run with
``.venv/bin/python -m benchmarks.techniques [--quick]``.
"""
import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from custom_keras.callbacks import CustomCallbacks  # noqa: E402
from custom_keras.reference import build_reference_model, load_digits_28  # noqa: E402
from custom_keras.techniques.activations import ActivationModel, EXCLUDE_LAYERS  # noqa: E402
from custom_keras.techniques.deconvolution import deconvolution  # noqa: E402
from custom_keras.techniques.deep_visualization import deep_visualization  # noqa: E402
from custom_keras.techniques.saliency import saliency_maps  # noqa: E402

BATCH_SIZE = 128
DEEP_VIS = dict(learning_rate=200, no_of_iterations=50, l2_decay=0.0001, blur_interval=4, blur_std=1.0)


def best_of(function, repeats):
    """The fastest of ``repeats`` calls, in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def report(name, value, baseline, target=None, higher_is_better=False):
    ratio = value / baseline
    verdict = ""
    if target is not None:
        met = ratio >= target if higher_is_better else ratio <= target
        verdict = "  target %s %.2f: %s" % (">=" if higher_is_better else "<=", target,
                                            "met" if met else "NOT met")
    print("%-58s %9.1f ms / %9.1f ms = %6.2f%s" % (name, value * 1e3, baseline * 1e3, ratio, verdict))
    return ratio


def fit_one_epoch(model, x, y, callbacks):
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def training_overhead(samples):
    """Item 1: one epoch with all visualizing callbacks (5 snapshots) against none, and TensorBoard."""
    x, y = load_digits_28(size=samples, shift=2)
    batches = int(np.ceil(samples / BATCH_SIZE))
    run_dir = tempfile.mkdtemp(prefix="bench-run-")
    os.makedirs(os.path.join(run_dir, "images"))
    Image.fromarray((x[0, :, :, 0] * 255).astype(np.uint8)).save(os.path.join(run_dir, "images", "digit.png"))
    model = build_reference_model()
    model.fit(x[:BATCH_SIZE * 4], y[:BATCH_SIZE * 4], batch_size=BATCH_SIZE, epochs=1, verbose=0)  # warm-up

    def visualizer_callbacks():
        callbacks = CustomCallbacks(run_dir, base_interval=max(1, batches // 5))
        callbacks.register_training_progress()
        callbacks.register_layer_activations()
        callbacks.register_saliency_maps()
        callbacks.register_deconvolutional_network(3, feat_map_amount=8)
        callbacks.register_deep_visualization([(9, unit) for unit in range(10)], **DEEP_VIS)
        return callbacks.get_list()

    def tensorboard_callbacks():
        return [keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), histogram_freq=1,
                                            update_freq="batch")]

    # Alternate the runs so that a slow phase of the machine hits all of them alike.
    plain, visualized, tensorboard = [], [], []
    for _ in range(2):
        plain.append(fit_one_epoch(model, x, y, []))
        visualized.append(fit_one_epoch(model, x, y, visualizer_callbacks()))
        tensorboard.append(fit_one_epoch(model, x, y, tensorboard_callbacks()))
    print("epoch of %d images, batch %d (%d batches), best of 2:" % (samples, BATCH_SIZE, batches))
    report("all five visualizing callbacks, 5 snapshots / no callbacks", min(visualized), min(plain), 1.15)
    report("Keras TensorBoard (batch scalars, histograms) / no callbacks", min(tensorboard), min(plain))
    shutil.rmtree(run_dir)


def trained_model():
    x, y = load_digits_28()
    model = build_reference_model()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return model, x[:1]


def forward_backward_floor(model, image):
    """One forward and backward pass of the same model on one image."""
    image = tf.constant(image)

    def step():
        with tf.GradientTape() as tape:
            tape.watch(image)
            output = model(image, training=False)
        return tape.gradient(output[:, 0], image).numpy()
    return step


def techniques(repeats):
    model, image = trained_model()
    floor_step = forward_backward_floor(model, image)
    floor_step()
    floor = best_of(floor_step, repeats)

    saliency_maps(model, image)
    report("saliency map / one forward+backward pass", best_of(lambda: saliency_maps(model, image), repeats),
           floor, 1.5)
    deconvolution(model, image, 2, feat_map_amount=32)
    report("deconvolution of 32 maps / one forward+backward pass",
           best_of(lambda: deconvolution(model, image, 2, feat_map_amount=32), repeats), floor, 3.0)

    activation_model = ActivationModel(model, EXCLUDE_LAYERS)
    layer_numbers = [no for no, layer in enumerate(model.layers) if not isinstance(layer, EXCLUDE_LAYERS)]
    per_layer = [keras.Model(model.inputs[0], model.layers[no].output) for no in layer_numbers]

    def one_function_per_layer():
        return [m(image, training=False) for m in per_layer]
    activation_model(image)
    one_function_per_layer()
    report("layer activations: one multi-output pass / one function per layer",
           best_of(lambda: activation_model(image), repeats), best_of(one_function_per_layer, repeats))

    units = [(8, unit) for unit in range(64)]
    batched = best_of(lambda: deep_visualization(model, units, seed=0, **DEEP_VIS), 1)
    one_at_a_time = best_of(lambda: [deep_visualization(model, [unit], seed=0, **DEEP_VIS) for unit in units], 1)
    report("deep visualization 64 units x 50 it.: one at a time / one batch", one_at_a_time, batched, 10,
           higher_is_better=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="an epoch of 12,000 images instead of 60,000")
    args = parser.parse_args()
    techniques(repeats=5)
    training_overhead(12000 if args.quick else 60000)


if __name__ == "__main__":
    main()
