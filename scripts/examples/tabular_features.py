"""A Dense network on a feature vector: which features decide the prediction.

The data are generated rows of six named features whose class depends on two
of them, so nothing is downloaded. A tabular model has no image: the script
gives the rows to visualize with ``visualization_inputs`` and their names with
``feature_names``. The deconvolutional network needs feature maps, which a
Dense-only model has not: it is registered here anyway and switched off with
its reason, while everything else runs.

Run it with ``python tabular_features.py``; outside the web tool the results land
beside this script. ``EPOCHS`` (environment) sets the number of epochs.
"""
import os

import keras
import numpy as np

from custom_keras.callbacks import CustomCallbacks

EPOCHS = int(os.environ.get("EPOCHS", "3"))
FEATURES = ["age", "income", "rooms", "distance", "noise_a", "noise_b"]


def rows(samples, seed):
    """Standard-normal features; class 1 when income - distance > 0 (the rest is noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, len(FEATURES))).astype(np.float32)
    labels = (x[:, 1] - x[:, 3] > 0).astype(int)
    return x, keras.utils.to_categorical(labels, 2)


print("Generating the rows")
x_train, y_train = rows(2000, seed=0)
x_val, y_val = rows(400, seed=1)

print("Creating the model")
inputs = keras.Input((len(FEATURES),))                            # layer 0
x = keras.layers.Dense(16, activation="relu")(inputs)             # layer 1
x = keras.layers.Dense(8, activation="relu")(x)                   # layer 2
outputs = keras.layers.Dense(2, activation="softmax")(x)          # layer 3
model = keras.Model(inputs, outputs)
model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
model.summary()

callbacks = CustomCallbacks(os.path.dirname(os.path.abspath(__file__)), base_interval=10,
                            visualization_inputs=x_val[:4], feature_names=FEATURES)
callbacks.register_network_saver()
callbacks.register_training_progress()
callbacks.register_layer_activations()
callbacks.register_saliency_maps()
callbacks.register_deconvolutional_network(1, feat_map_amount=4)
callbacks.register_deep_visualization([(3, 0), (3, 1)], learning_rate=0.5, no_of_iterations=30,
                                      l2_decay=0.01)

print("Training for %d epochs" % EPOCHS)
model.fit(x_train, y_train, batch_size=32, epochs=EPOCHS, validation_data=(x_val, y_val),
          callbacks=callbacks.get_list())

loss, accuracy = model.evaluate(x_val, y_val, verbose=0)
print("Validation loss %.4f, accuracy %.4f" % (loss, accuracy))
