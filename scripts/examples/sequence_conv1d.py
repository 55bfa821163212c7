"""A Conv1D network on sequences: which time steps and channels decide the class.

The data are generated waves of two channels, 64 time steps each, in three
classes by frequency, so nothing is downloaded. A sequence model has no image:
the script gives the inputs to visualize with ``visualization_inputs``.

Run it with ``python sequence_conv1d.py``; outside the web tool the results land
beside this script. ``EPOCHS`` (environment) sets the number of epochs.
"""
import os

import keras
import numpy as np

from custom_keras.callbacks import CustomCallbacks

EPOCHS = int(os.environ.get("EPOCHS", "3"))
STEPS, CLASSES = 64, 3


def waves(samples, seed):
    """Noisy waves (samples, STEPS, 2): class c has frequency c + 1 in channel 0, noise in 1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, samples)
    time = np.linspace(0, 2 * np.pi, STEPS)
    phase = rng.uniform(0, 2 * np.pi, (samples, 1))
    signal = np.sin((labels[:, None] + 1) * time + phase)
    x = np.stack([signal, np.zeros_like(signal)], axis=-1) + rng.normal(0, 0.3, (samples, STEPS, 2))
    return x.astype(np.float32), keras.utils.to_categorical(labels, CLASSES)


print("Generating the waves")
x_train, y_train = waves(1200, seed=0)
x_val, y_val = waves(300, seed=1)

print("Creating the model")
model = keras.Sequential([
    keras.Input((STEPS, 2)),
    keras.layers.Conv1D(8, 5, activation="relu"),          # layer 0
    keras.layers.MaxPooling1D(2),                          # layer 1
    keras.layers.Conv1D(8, 5, activation="relu"),          # layer 2
    keras.layers.GlobalAveragePooling1D(),                 # layer 3
    keras.layers.Dense(CLASSES, activation="softmax"),     # layer 4
])
model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
model.summary()

callbacks = CustomCallbacks(os.path.dirname(os.path.abspath(__file__)), base_interval=10,
                            visualization_inputs=x_val[:3])
callbacks.register_network_saver()
callbacks.register_training_progress()
callbacks.register_layer_activations()
callbacks.register_saliency_maps()
callbacks.register_deconvolutional_network(2, feat_map_amount=4)
callbacks.register_deep_visualization([(4, unit) for unit in range(CLASSES)], learning_rate=0.5,
                                      no_of_iterations=30, l2_decay=0.01, blur_interval=4,
                                      blur_std=1.0)

print("Training for %d epochs" % EPOCHS)
model.fit(x_train, y_train, batch_size=32, epochs=EPOCHS, validation_data=(x_val, y_val),
          callbacks=callbacks.get_list())

loss, accuracy = model.evaluate(x_val, y_val, verbose=0)
print("Validation loss %.4f, accuracy %.4f" % (loss, accuracy))
