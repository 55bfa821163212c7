"""Benchmarks of the attribution functions on the reference network.

Each method is timed against one compiled forward+backward pass (``SaliencyModel``'s
gradient graph, traced once) on the same images, both warmed up, in turns, in this one process:
the figures are ratios, so they mean something on a shared, noisy machine. SmoothGrad
(50 samples of one image) and Integrated Gradients (64 steps for one image) are timed
against one batched pass of 50 and 64 images. Run with
``.venv/bin/python -m benchmarks.attribution [--repeats N]``.
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from benchmarks.techniques import best_of, report  # noqa: E402
from custom_keras.reference import build_reference_model, load_digits_28  # noqa: E402
from custom_keras.techniques import attribution  # noqa: E402
from custom_keras.techniques.saliency import SaliencyModel  # noqa: E402

IMAGES = 8  # a callback's snapshot of a few images


def paired(function, baseline, repeats):
    """``(seconds of function, seconds of baseline)``, each the fastest of ``repeats`` calls,
    taken in turns so that both meet the same load from other processes."""
    function()  # traces the graph once
    baseline()
    times = [(best_of(function, 1), best_of(baseline, 1)) for _ in range(repeats)]
    return tuple(min(column) for column in zip(*times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="calls per figure; the fastest counts")
    repeats = parser.parse_args().repeats
    model = build_reference_model()
    images, _ = load_digits_28(64)
    batch, one = images[:IMAGES], images[:1]
    pass_of = SaliencyModel(model).gradients
    print("Reference network, %d images; one forward+backward pass = the compiled gradient graph"
          % IMAGES)
    for name, function, target in (
            ("grad_cam", attribution.grad_cam, 1.5),
            ("guided_backprop", attribution.guided_backprop, 1.5),
            ("lrp (epsilon)", attribution.lrp, 3),
            ("lrp (alpha_beta, z_b first)", lambda m, x: attribution.lrp(
                m, x, rule="alpha_beta", alpha=2, beta=1, first_layer_rule="z_b"), None),
            ("grad_cam_plus_plus", attribution.grad_cam_plus_plus, None),
            ("guided_grad_cam", attribution.guided_grad_cam, None),
            ("score_cam (32 maps)", attribution.score_cam, None),
            ("occlusion (patch 8, stride 4: 36 patches)", attribution.occlusion, None)):
        report("%s / one pass" % name,
               *paired(lambda: function(model, batch), lambda: pass_of(batch), repeats), target)
    for name, function, copies, target in (
            ("smooth_grad, 50 samples of 1 image",
             lambda: attribution.smooth_grad(model, one, seed=0), 50, 1.2),
            ("integrated_gradients, 64 steps for 1 image",
             lambda: attribution.integrated_gradients(model, one), 64, 1.2)):
        copied = np.repeat(one, copies, axis=0)
        report("%s / one pass of %d images" % (name, copies),
               *paired(function, lambda: pass_of(copied), repeats), target)


if __name__ == "__main__":
    main()
