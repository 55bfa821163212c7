"""The regularisers of deep visualization (Yosinski et al.; thesis Section 2.3.5).

Each works on a batch ``(N, *spatial, channels)`` (channels last) image by
image, so an image's result never depends on the others in its batch.
Percentiles are taken over one image.
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def l2_decay(images, decay):
    """Shrink every value towards 0: ``x *= (1 - decay)``, so extreme pixels cannot dominate."""
    return images * np.float32(1.0 - decay)


def gaussian_blur(images, std):
    """Blur each image and channel over its spatial axes only (not the batch or channel axis)."""
    sigma = (0,) + (std,) * (images.ndim - 2) + (0,)
    return ndimage.gaussian_filter(images, sigma=sigma).astype(images.dtype)


def _zero_below_percentile(images, scores, percentile):
    """Set the values (or, for scores without a channel axis, pixels) scoring below the
    image's ``percentile`` of ``scores`` to 0."""
    flat = scores.reshape(len(scores), -1)
    thresholds = np.percentile(flat, percentile, axis=1)
    small = (flat < thresholds[:, np.newaxis]).reshape(scores.shape)
    if small.ndim < images.ndim:
        small = small[..., np.newaxis]
    return np.where(small, np.float32(0), images).astype(images.dtype)


def clip_by_value(images, percentile):
    """Zero the ``percentile`` % of values (each channel separately) with the smallest |x|."""
    return _zero_below_percentile(images, np.abs(images), percentile)


def clip_by_norm(images, percentile):
    """Zero the ``percentile`` % of pixels with the smallest norm over their channels."""
    return _zero_below_percentile(images, np.linalg.norm(images, axis=-1), percentile)


def pixel_contributions(images, gradients):
    """First-order estimate of each pixel's share of the activation: sum over channels of x * grad."""
    return np.sum(images * gradients, axis=-1)


def clip_by_contribution(images, gradients, percentile):
    """Zero the ``percentile`` % of pixels with the smallest (most negative) contribution."""
    return _zero_below_percentile(images, pixel_contributions(images, gradients), percentile)


def clip_by_abs_contribution(images, gradients, percentile):
    """Zero the ``percentile`` % of pixels whose contribution is closest to 0 in either direction."""
    return _zero_below_percentile(
        images, np.abs(pixel_contributions(images, gradients)), percentile)


def _check_number(name, value, in_range, expected):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError("%s must be a number, got %r" % (name, value))
    if not in_range(value):  # NaN is in no range
        raise ValueError("%s must be %s, got %r" % (name, expected, value))


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError("%s must be an int, got %r" % (name, value))
    if value < low:
        raise ValueError("%s must be an int >= %d, got %r" % (name, low, value))


def check_regularizers(learning_rate, no_of_iterations, l2_decay, blur_interval, blur_std,
                       value_percentile, norm_percentile, contribution_percentile,
                       abs_contribution_percentile):
    """Raise ValueError/TypeError naming the argument unless all settings are in range.

    Ranges as thesis Appendix C.2.6: ``learning_rate`` > 0, ``no_of_iterations``
    an int >= 1, ``l2_decay`` in [0, 1], ``blur_interval`` an int >= 0,
    ``blur_std`` >= 0, every percentile in [0, 100].
    """
    _check_number("learning_rate", learning_rate, lambda v: 0 < v < math.inf, "a finite number > 0")
    _check_int("no_of_iterations", no_of_iterations, 1)
    _check_number("l2_decay", l2_decay, lambda v: 0 <= v <= 1, "in [0, 1]")
    _check_int("blur_interval", blur_interval, 0)
    _check_number("blur_std", blur_std, lambda v: 0 <= v < math.inf, "a finite number >= 0")
    for name, value in (("value_percentile", value_percentile),
                        ("norm_percentile", norm_percentile),
                        ("contribution_percentile", contribution_percentile),
                        ("abs_contribution_percentile", abs_contribution_percentile)):
        _check_number(name, value, lambda v: 0 <= v <= 100, "in [0, 100]")


@dataclass(frozen=True)
class Regularizers:
    """The regularisers applied after every gradient step, in Yosinski et al.'s order.

    A setting of 0 turns its regulariser off; blurring needs both
    ``blur_interval`` and ``blur_std`` and happens on iterations 0,
    ``blur_interval``, 2 * ``blur_interval``, ...

    Args:
        l2_decay: decay rate in [0, 1].
        blur_interval: blur every this many iterations.
        blur_std: standard deviation of the Gaussian blur in pixels.
        value_percentile, norm_percentile, contribution_percentile,
        abs_contribution_percentile: clipping percentiles in [0, 100].
    """
    l2_decay: float = 0
    blur_interval: int = 0
    blur_std: float = 0
    value_percentile: float = 0
    norm_percentile: float = 0
    contribution_percentile: float = 0
    abs_contribution_percentile: float = 0

    def __call__(self, images, gradients, iteration):
        """Regularise ``images`` after the step of ``iteration`` (0-based) that used ``gradients``."""
        if self.l2_decay:
            images = l2_decay(images, self.l2_decay)
        if self.blur_interval and self.blur_std and iteration % self.blur_interval == 0:
            images = gaussian_blur(images, self.blur_std)
        if self.norm_percentile:
            images = clip_by_norm(images, self.norm_percentile)
        if self.value_percentile:
            images = clip_by_value(images, self.value_percentile)
        if self.contribution_percentile:
            images = clip_by_contribution(images, gradients, self.contribution_percentile)
        if self.abs_contribution_percentile:
            images = clip_by_abs_contribution(images, gradients, self.abs_contribution_percentile)
        return images
