"""The reference network and offline data used by tests, benchmarks and examples.

The network is the 2017 thesis' MNIST network (DESIGN.md); the data is
scikit-learn's 8x8 digits, which ship inside the package, upscaled to 28x28,
so nothing is downloaded.
"""
import keras
import numpy as np


def build_reference_model(num_classes=10):
    """Input 28x28x1, Conv 32, Conv 32, MaxPool, Dropout, Flatten, Dense 128, Dropout, Dense 64, Dense 10.

    A functional model: layer 0 is the InputLayer, the pool is layer 3, the output layer 9.
    """
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(32, (3, 3), activation="relu")(inputs)
    x = keras.layers.Conv2D(32, (3, 3), activation="relu")(x)
    x = keras.layers.MaxPooling2D((2, 2))(x)
    x = keras.layers.Dropout(0.25)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def load_digits_28(size=None, shift=0, seed=0):
    """scikit-learn's digits upscaled to 28x28 in [0, 1]: (x (N, 28, 28, 1) float32, y one-hot (N, 10)).

    Args:
        size: number of samples; more than the 1797 digits repeats them.
        shift: maximum random shift in pixels, so repeated digits differ.
        seed: random seed for the repetition order and the shifts.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    # 8x8 -> 24x24 by nearest neighbour, then a 2-pixel frame as in MNIST.
    images = np.kron(images, np.ones((3, 3), dtype=np.float32))
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    labels = digits.target
    rng = np.random.default_rng(seed)
    if size is not None:
        order = rng.permutation(np.resize(np.arange(len(images)), size))
        images, labels = images[order], labels[order]
    if shift:
        shifts = rng.integers(-shift, shift + 1, size=(len(images), 2))
        images = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(images, shifts)])
    return images[..., np.newaxis], keras.utils.to_categorical(labels, 10).astype(np.float32)
