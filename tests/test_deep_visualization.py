"""Deep visualization (Yosinski et al.): objectives, regularisers, the one-batch loop, validation."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from custom_keras.reference import build_reference_model, load_digits_28  # noqa: E402
from custom_keras.techniques.common import LayerScore  # noqa: E402
from custom_keras.techniques.deep_visualization import (  # noqa: E402
    DeepVisualizationModel, Regularizers, UnitObjective, check_regularizers, check_units, deep_visualization,
    gradient_ascent, random_noise_images, transforms)
from custom_keras.techniques.deep_visualization.objectives import redirected_relu  # noqa: E402

# The thesis' MNIST settings (Section 5): learning rate 200, 50 iterations, Table 2.1 row 3.
TABLE_2_1_ROW_3 = dict(l2_decay=0.0001, blur_interval=4, blur_std=1.0)
THESIS = dict(learning_rate=200, no_of_iterations=50, **TABLE_2_1_ROW_3)
CONV_LAYER, DENSE_LAYER, OUTPUT_LAYER = 2, 8, 9


@pytest.fixture(scope="module")
def trained_model():
    """The reference network after two epochs on the 1797 digits, batch 32."""
    keras.utils.set_random_seed(0)
    model = build_reference_model()
    x, y = load_digits_28()
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    return model


def most_active_unit(model, layer_no, candidates, seed):
    """The candidate unit with the highest activation for the start image of a lone unit.

    A ReLU unit that is off for its start image gets no gradient and stays off.
    """
    units = [(layer_no, index) for index in candidates]
    start = np.repeat(random_noise_images((28, 28, 1), 1, seed), len(units), axis=0)
    return units[int(np.argmax(UnitObjective(model, units)(start)))]


# --- objective ---------------------------------------------------------------------------

@pytest.mark.parametrize("layer_no, candidates", [
    (DENSE_LAYER, list(range(64))),
    (CONV_LAYER, [(12, 12, channel) for channel in range(32)]),
])
def test_unit_activation_rises_far_above_random_start(trained_model, layer_no, candidates):
    unit = most_active_unit(trained_model, layer_no, candidates, seed=3)
    start_value = UnitObjective(trained_model, [unit])(random_noise_images((28, 28, 1), 1, 3))[0]
    image, layer_name, index, loss_value = deep_visualization(trained_model, [unit], seed=3,
                                                              **THESIS)[0]
    assert layer_name == trained_model.layers[layer_no].name
    assert index == unit[1]
    assert start_value > 0
    assert loss_value > 10 * start_value and loss_value > start_value + 50
    assert image.shape == (28, 28, 1) and image.dtype == np.float32
    assert UnitObjective(trained_model, [unit])(image[np.newaxis])[0] == pytest.approx(loss_value)


def test_output_units_use_pre_softmax_score_and_model_keeps_softmax(trained_model):
    images = random_noise_images((28, 28, 1), 3, seed=1)
    units = [(OUTPUT_LAYER, 4), (OUTPUT_LAYER, 7), (DENSE_LAYER, 5)]
    values = UnitObjective(trained_model, units)(images)
    logits = LayerScore(trained_model, OUTPUT_LAYER)(images).numpy()
    dense = LayerScore(trained_model, DENSE_LAYER)(images).numpy()
    np.testing.assert_allclose(values, [logits[0, 4], logits[1, 7], dense[2, 5]], rtol=1e-5,
                               atol=1e-5)
    result = deep_visualization(trained_model, units[:1], 200, 5, seed=1)
    assert result[0][3] > 1  # a score, not a probability
    probabilities = trained_model.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)


def test_softmax_as_own_layer_in_sequential_model():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(4),
                              keras.layers.Activation("softmax")])
    (image, layer_name, index, loss_value), conv = deep_visualization(
        model, [(3, 2), (0, (1, 1, 0))], 1.0, 20, seed=0)
    assert (layer_name, index) == (model.layers[3].name, 2)
    assert image.shape == (6, 6, 2)
    dense_output = keras.Model(model.inputs[0], model.layers[2].output)(image[np.newaxis])
    assert loss_value == pytest.approx(float(dense_output[0, 2]), rel=1e-5)
    assert loss_value > 1  # a score: softmax outputs stay below 1
    assert conv[1:] == (model.layers[0].name, (1, 1, 0), pytest.approx(conv[3]))


def test_redirected_relu_keeps_forward_and_redirects_only_dead_images():
    import tensorflow as tf

    x = tf.constant([[1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]])  # image 1: every ReLU off
    upstream = tf.constant([[5.0, 6.0, -7.0], [5.0, 6.0, -7.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = redirected_relu(x)
        total = tf.reduce_sum(y * upstream)
    np.testing.assert_array_equal(y, tf.nn.relu(x))
    # Image 0 has gradient through an open ReLU: plain ReLU gradient. Image 1 has
    # none: gradient passes where it raises a negative input, not where it lowers it.
    np.testing.assert_array_equal(tape.gradient(total, x), [[5, 0, 0], [5, 6, 0]])


def test_redirected_relu_steps_switch_on_units_that_start_off(trained_model):
    start = random_noise_images((28, 28, 1), 1, seed=0)
    activations = LayerScore(trained_model, 6)(start).numpy()[0]
    unit = (6, int(np.argmin(activations)))  # a unit that is off for the start image
    objective = UnitObjective(trained_model, [unit])
    assert objective(start)[0] == 0
    plain = gradient_ascent(objective, start, 200, 50, Regularizers(**TABLE_2_1_ROW_3),
                            redirected_relu_steps=0)
    assert objective(plain)[0] == 0
    image, _, _, loss_value = deep_visualization(trained_model, [unit], seed=0, **THESIS)[0]
    assert loss_value > 50


# --- one batch ---------------------------------------------------------------------------

def test_one_batch_gives_same_result_as_each_unit_alone(trained_model):
    units = [(OUTPUT_LAYER, 2), (CONV_LAYER, (10, 12, 3)), (DENSE_LAYER, 7), (6, 11)]
    settings = dict(THESIS, norm_percentile=10)
    together = deep_visualization(trained_model, units, seed=5, **settings)
    alone = deep_visualization(trained_model, units[:1], seed=5, **settings)[0]
    np.testing.assert_allclose(together[0][0], alone[0], rtol=1e-3, atol=1e-3 * np.abs(alone[0]).max())
    assert together[0][3] == pytest.approx(alone[3], rel=1e-3)

    # Every position, with every regulariser: an image's steps never depend on the others in
    # its batch, nor on its place in it.
    start = random_noise_images((28, 28, 1), len(units), seed=5)
    regularizers = Regularizers(0.0001, 4, 1.0, value_percentile=5, norm_percentile=10,
                                contribution_percentile=5, abs_contribution_percentile=5)
    batch = gradient_ascent(UnitObjective(trained_model, units), start, 200, 20, regularizers)
    order = [2, 0, 3, 1]
    reordered = gradient_ascent(UnitObjective(trained_model, [units[i] for i in order]),
                                start[order], 200, 20, regularizers)
    np.testing.assert_allclose(reordered, batch[order], rtol=1e-5, atol=1e-5 * np.abs(batch).max())
    others = np.concatenate([start[:1], random_noise_images((28, 28, 1), 3, seed=6)])
    changed = gradient_ascent(UnitObjective(trained_model, units), others, 200, 20, regularizers)
    np.testing.assert_allclose(changed[0], batch[0], rtol=1e-5, atol=1e-5 * np.abs(batch[0]).max())
    # Against each image alone, over the first steps (blur and every clipping included). A
    # batch of another size rounds differently in the last float32 bits; after a few steps at
    # learning rate 200 a percentile clip can turn such a difference into a zeroed pixel, and
    # the two runs part ways, so longer runs are compared above at one batch size.
    batch = gradient_ascent(UnitObjective(trained_model, units), start, 200, 3, regularizers)
    for i, unit in enumerate(units):
        single = gradient_ascent(UnitObjective(trained_model, [unit]), start[i:i + 1], 200, 3,
                                 regularizers)
        np.testing.assert_allclose(batch[i], single[0], rtol=1e-3,
                                   atol=1e-3 * np.abs(single).max() + 1e-6)


def test_same_seed_same_images_and_different_seeds_differ(trained_model):
    units = [(OUTPUT_LAYER, 1), (OUTPUT_LAYER, 1)]
    first = deep_visualization(trained_model, units, 200, 3, seed=11)
    second = deep_visualization(trained_model, units, 200, 3, seed=11)
    np.testing.assert_array_equal(first[0][0], second[0][0])
    assert not np.allclose(first[0][0], first[1][0])  # two starts: two variations of one unit


def test_deep_visualization_model_built_once_follows_training():
    keras.utils.set_random_seed(4)
    model = build_reference_model()
    visualize = DeepVisualizationModel(model, [(OUTPUT_LAYER, 6), (CONV_LAYER, (3, 4, 5))],
                                       200, 5, **TABLE_2_1_ROW_3)
    before = visualize(seed=1)
    assert before[0][1:3] == (model.layers[OUTPUT_LAYER].name, 6)
    assert before[1][1:3] == (model.layers[CONV_LAYER].name, (3, 4, 5))
    assert before[0][3] == pytest.approx(
        deep_visualization(model, [(OUTPUT_LAYER, 6)], 200, 5, seed=1, **TABLE_2_1_ROW_3)[0][3],
        rel=1e-3)
    # Training changes the weights in place; the built objective sees the new ones.
    output = model.layers[OUTPUT_LAYER]
    output.kernel.assign(np.zeros(output.kernel.shape, np.float32))
    output.bias.assign(np.arange(10, dtype=np.float32))
    after = visualize(seed=1)
    assert after[0][3] == pytest.approx(6.0)
    np.testing.assert_allclose(after[1][0], before[1][0], rtol=1e-4, atol=1e-6)


# --- regulariser sets of Table 2.1 -------------------------------------------------------

@pytest.mark.parametrize("l2_decay, blur_interval, blur_std, norm_percentile, abs_contribution, "
                         "zero_fraction", [
                             (0, 4, 0.5, 50, 0, 0.5),
                             (0.3, 0, 0, 20, 0, 0.2),
                             (0.0001, 4, 1.0, 0, 0, 0),
                             (0, 4, 0.5, 0, 90, 0.9),
                         ])
def test_table_2_1_regularizer_sets(trained_model, l2_decay, blur_interval, blur_std,
                                    norm_percentile, abs_contribution, zero_fraction):
    units = [(OUTPUT_LAYER, 3), (CONV_LAYER, (12, 12, 0)), (DENSE_LAYER, 0)]
    results = deep_visualization(trained_model, units, 200, 50, l2_decay=l2_decay,
                                 blur_interval=blur_interval, blur_std=blur_std,
                                 norm_percentile=norm_percentile,
                                 abs_contribution_percentile=abs_contribution, seed=2)
    assert [(name, index) for _, name, index, _ in results] == [
        (trained_model.layers[layer_no].name, index) for layer_no, index in units]
    for image, _, _, loss_value in results:
        assert image.shape == (28, 28, 1) and image.dtype == np.float32
        assert np.all(np.isfinite(image)) and np.isfinite(loss_value)
    # Clipping is the last regulariser of every step, so its share of zeros stays (for a
    # unit with a gradient: a ReLU unit that is off everywhere has no contributions to rank).
    assert np.mean(results[0][0] == 0) >= zero_fraction - 0.01
    start_score = UnitObjective(trained_model, units[:1])(random_noise_images((28, 28, 1), 1, 2))
    assert results[0][3] > start_score[0] + 10


# --- transforms --------------------------------------------------------------------------

def test_l2_decay_shrinks_towards_zero():
    images = np.array([[[[2.0, -4.0]]]], np.float32)
    np.testing.assert_allclose(transforms.l2_decay(images, 0.25), [[[[1.5, -3.0]]]])


def test_gaussian_blur_keeps_mean_and_removes_high_frequencies():
    rng = np.random.default_rng(0)
    images = rng.normal(0.3, 1.0, (2, 28, 28, 3)).astype(np.float32)
    images[1] = 0  # blurring one image must not leak into another
    images[0, ..., 2] = 0  # nor into another channel
    blurred = transforms.gaussian_blur(images, 1.0)
    assert blurred.shape == images.shape and blurred.dtype == np.float32
    assert blurred[0, ..., :2].mean() == pytest.approx(images[0, ..., :2].mean(), abs=0.01)
    assert np.all(blurred[1] == 0) and np.all(blurred[0, ..., 2] == 0)

    def high_frequency_energy(x):
        return np.mean(np.diff(x, axis=1) ** 2) + np.mean(np.diff(x, axis=2) ** 2)
    assert high_frequency_energy(blurred[0]) < 0.1 * high_frequency_energy(images[0])
    checkerboard = (np.indices((1, 16, 16, 1)).sum(axis=0) % 2).astype(np.float32)
    np.testing.assert_allclose(transforms.gaussian_blur(checkerboard, 2.0), 0.5, atol=0.03)


@pytest.mark.parametrize("percentile", [10, 50, 90])
def test_clip_by_value_zeroes_smallest_values(percentile):
    images = np.random.default_rng(1).normal(size=(3, 10, 10, 3)).astype(np.float32)
    clipped = transforms.clip_by_value(images, percentile)
    for original, result in zip(images, clipped):
        zeroed = result == 0
        assert zeroed.mean() == pytest.approx(percentile / 100, abs=0.01)
        assert np.abs(original[zeroed]).max() <= np.abs(original[~zeroed]).min()
        np.testing.assert_array_equal(result[~zeroed], original[~zeroed])


def test_clip_by_norm_zeroes_whole_pixels_with_smallest_norm():
    images = np.random.default_rng(2).normal(size=(2, 10, 10, 3)).astype(np.float32)
    clipped = transforms.clip_by_norm(images, 30)
    norms = np.linalg.norm(images, axis=-1)
    for original_norms, result in zip(norms, clipped):
        zeroed_pixels = np.all(result == 0, axis=-1)
        assert zeroed_pixels.mean() == pytest.approx(0.3, abs=0.01)
        assert np.all((result == 0) == zeroed_pixels[..., np.newaxis])  # all channels together
        assert original_norms[zeroed_pixels].max() <= original_norms[~zeroed_pixels].min()


def test_contribution_clipping_signed_and_absolute():
    # Four pixels of one two-channel image; contribution = sum over channels of x * grad.
    images = np.array([[[[1, 1], [2, 0]], [[-3, 0], [0.1, 0]]]], np.float32)
    gradients = np.array([[[[1, 1], [-5, 0]], [[1, 0], [1, 0]]]], np.float32)
    np.testing.assert_allclose(transforms.pixel_contributions(images, gradients),
                               [[[2, -10], [-3, 0.1]]])
    signed = transforms.clip_by_contribution(images, gradients, 50)
    np.testing.assert_allclose(signed, [[[[1, 1], [0, 0]], [[0, 0], [0.1, 0]]]])
    absolute = transforms.clip_by_abs_contribution(images, gradients, 50)
    np.testing.assert_allclose(absolute, [[[[0, 0], [2, 0]], [[-3, 0], [0, 0]]]])


def test_regularizers_blur_only_every_interval_and_zero_settings_do_nothing():
    images = np.random.default_rng(3).normal(size=(1, 8, 8, 1)).astype(np.float32)
    gradients = np.ones_like(images)
    blur = Regularizers(blur_interval=4, blur_std=1.0)
    np.testing.assert_array_equal(blur(images, gradients, 1), images)
    np.testing.assert_array_equal(blur(images, gradients, 8),
                                  transforms.gaussian_blur(images, 1.0))
    np.testing.assert_array_equal(Regularizers(blur_interval=4)(images, gradients, 0), images)
    np.testing.assert_array_equal(Regularizers()(images, gradients, 0), images)


def test_random_noise_images_are_seeded_per_position():
    batch = random_noise_images((4, 4, 3), 3, seed=9)
    assert batch.shape == (3, 4, 4, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(random_noise_images((4, 4, 3), 1, seed=9)[0], batch[0])
    assert not np.array_equal(batch[0], batch[1])


# --- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("units, error, message", [
    ([], TypeError, "units_to_visualize must be a non-empty list"),
    ("9,1", TypeError, "units_to_visualize must be a non-empty list"),
    ([(9, 1), 9], TypeError, "units_to_visualize[1] must be a (layer_no, index) tuple"),
    ([(10, 1)], ValueError, "units_to_visualize[0] layer_no=10 is out of range"),
    ([(-1, 1)], ValueError, "units_to_visualize[0] layer_no=-1 is out of range"),
    ([("dense", 1)], TypeError, "units_to_visualize[0] layer_no must be an int"),
    ([(9, 10)], ValueError, "units_to_visualize[0]: index 10 is out of range for layer 9"),
    ([(2, (24, 0, 0))], ValueError, "units_to_visualize[0]: index (24, 0, 0) is out of range"),
    ([(2, (0, 0, 32))], ValueError, "out of range for layer 2"),
    ([(2, 5)], TypeError, "units_to_visualize[0]: layer 2 (conv2d_1) has 3-D output"),
    ([(2, (1, 2))], TypeError, "must be a tuple of 3 ints"),
    ([(9, (1, 2, 3))], TypeError, "has 1-D output (10,), so the index must be an int"),
    ([(9, 1.0)], TypeError, "so the index must be an int"),
    ([(9, True)], TypeError, "so the index must be an int"),
])
def test_check_units_rejects_bad_units(trained_model, units, error, message):
    with pytest.raises(error) as raised:
        check_units(trained_model, units)
    # Keras numbers layer names per process; the message names the layer.
    assert message.replace("conv2d_1", trained_model.layers[2].name) in str(raised.value)


def test_check_units_accepts_good_units(trained_model):
    check_units(trained_model, [(9, 0), (9, np.int64(9)), (2, (23, 23, 31)), (3, [0, 0, 0]),
                                (0, (27, 27, 0))])


GOOD = dict(learning_rate=200, no_of_iterations=50, l2_decay=0.0001, blur_interval=4,
            blur_std=1.0, value_percentile=0, norm_percentile=0, contribution_percentile=0,
            abs_contribution_percentile=0)


@pytest.mark.parametrize("argument, value, error", [
    ("learning_rate", 0, ValueError), ("learning_rate", -1.0, ValueError),
    ("learning_rate", float("inf"), ValueError), ("learning_rate", "200", TypeError),
    ("no_of_iterations", 0, ValueError), ("no_of_iterations", 2.5, TypeError),
    ("no_of_iterations", True, TypeError),
    ("l2_decay", -0.1, ValueError), ("l2_decay", 1.5, ValueError),
    ("l2_decay", float("nan"), ValueError), ("l2_decay", None, TypeError),
    ("blur_interval", -1, ValueError), ("blur_interval", 4.0, TypeError),
    ("blur_std", -0.5, ValueError),
    ("value_percentile", 101, ValueError), ("norm_percentile", -1, ValueError),
    ("contribution_percentile", 100.5, ValueError),
    ("abs_contribution_percentile", "90", TypeError),
])
def test_check_regularizers_names_the_bad_argument(argument, value, error):
    with pytest.raises(error, match=argument):
        check_regularizers(**dict(GOOD, **{argument: value}))


def test_check_regularizers_accepts_range_ends():
    check_regularizers(**GOOD)
    check_regularizers(**dict(GOOD, learning_rate=1e-6, no_of_iterations=np.int32(1), l2_decay=1,
                              blur_interval=0, blur_std=0, value_percentile=100,
                              norm_percentile=0.5, contribution_percentile=np.float32(100),
                              abs_contribution_percentile=100))


def test_deep_visualization_checks_its_arguments(trained_model):
    with pytest.raises(ValueError, match="l2_decay"):
        deep_visualization(trained_model, [(9, 1)], 200, 50, l2_decay=2)
    with pytest.raises(ValueError, match=r"units_to_visualize\[0\]"):
        deep_visualization(trained_model, [(9, 11)], 200, 50)


# --- the thesis' MNIST result ------------------------------------------------------------

def test_output_unit_visualizations_are_classified_as_their_class(trained_model):
    results = deep_visualization(trained_model, [(OUTPUT_LAYER, digit) for digit in range(10)],
                                 seed=0, **THESIS)
    images = np.stack([image for image, _, _, _ in results])
    predicted = trained_model.predict(images, verbose=0).argmax(axis=1)
    np.testing.assert_array_equal(predicted, np.arange(10))
    assert [index for _, _, index, _ in results] == list(range(10))
