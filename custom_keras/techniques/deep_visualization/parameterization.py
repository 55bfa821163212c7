"""The start images of deep visualization: one seeded random-noise image per unit."""
import numpy as np

# Noise of mean 0 and std 0.5, about the spread of a [0, 1] input image. With
# the thesis' settings (learning rate 200, 50 iterations) the first step alone
# moves a pixel by about 5 (pre-softmax gradients are about 0.02 per pixel), so
# the unit, not the noise, shapes the image: output units of the trained
# reference network come out as their digits for any std from 0.04 (Yosinski
# et al.'s 10 on the 0..255 scale) to 2. Without redirected ReLU gradients
# (optimize.REDIRECTED_RELU_STEPS = 0) the std decides which ReLU units are on
# at the start and so can grow: 0.5 then leaves 73 of 224 hidden units of that
# network at activation 0, 0.04 leaves 96.
START_NOISE_STD = 0.5


def random_noise_images(input_shape, count, seed=None, std=START_NOISE_STD):
    """A batch of Gaussian-noise images with mean 0.

    Image ``i`` depends only on ``seed`` and ``i`` (its own child of the seed
    sequence), so optimising one unit alone starts from the same image as the
    first unit of a batch with the same seed.

    Args:
        input_shape: shape of one image, e.g. ``(28, 28, 1)``.
        count: number of images.
        seed: int seed, or None for fresh randomness.
        std: standard deviation of the noise.

    Returns:
        float32 array of shape ``(count, *input_shape)``.
    """
    children = np.random.SeedSequence(seed).spawn(count)
    images = [np.random.default_rng(child).normal(0.0, std, input_shape) for child in children]
    return np.asarray(images, dtype=np.float32).reshape((count,) + tuple(input_shape))
