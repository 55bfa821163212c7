"""A functional model with a skip connection and softmax as its own layer.

Shows that the callbacks work beyond a plain stack: the second convolution's
output is added to the first's (a residual skip), a Concatenate joins two
pooled branches, and the softmax is a separate layer, so saliency and deep
visualization use the scores before it.

Run it with ``python functional_skip.py``; outside the web tool the results land
beside this script. ``EPOCHS`` (environment) sets the number of epochs.
"""
import os

import keras

from custom_keras.callbacks import CustomCallbacks
from custom_keras.reference import load_digits_28

EPOCHS = int(os.environ.get("EPOCHS", "2"))
BATCH_SIZE = 64

print("Loading the digits")
x_train, y_train = load_digits_28(size=2000, shift=2, seed=0)
x_val, y_val = load_digits_28(size=500, shift=2, seed=1)

print("Creating the model")
# A fixed seed: the same weights every run, so the example shows the same curves each time
# (unseeded, its dense layer sometimes starts with over half its ReLUs dead).
keras.utils.set_random_seed(0)
inputs = keras.Input((28, 28, 1))                                                   # layer 0
conv_1 = keras.layers.Conv2D(16, (3, 3), padding="same", activation="relu")(inputs)  # layer 1
conv_2 = keras.layers.Conv2D(16, (3, 3), padding="same", activation="relu")(conv_1)  # layer 2
skip = keras.layers.Add()([conv_1, conv_2])                                         # layer 3
max_pool = keras.layers.MaxPooling2D((2, 2))(skip)                                  # layer 4
average_pool = keras.layers.AveragePooling2D((2, 2))(skip)                          # layer 5
pooled = keras.layers.Concatenate()([max_pool, average_pool])                       # layer 6
x = keras.layers.Flatten()(pooled)                                                  # layer 7
x = keras.layers.Dense(32, activation="relu")(x)                                    # layer 8
scores = keras.layers.Dense(10)(x)                                                  # layer 9
outputs = keras.layers.Softmax()(scores)                                            # layer 10
model = keras.Model(inputs, outputs)
model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
model.summary()

callbacks = CustomCallbacks(os.path.dirname(os.path.abspath(__file__)), base_interval=8)
callbacks.register_network_saver()
callbacks.register_training_progress()
callbacks.register_layer_activations()
callbacks.register_saliency_maps()
callbacks.register_deconvolutional_network(1, feat_map_amount=4)
callbacks.register_deep_visualization([(10, unit) for unit in range(10)], learning_rate=200,
                                      no_of_iterations=30, l2_decay=0.0001, blur_interval=4,
                                      blur_std=1.0)

print("Training for %d epochs" % EPOCHS)
model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=EPOCHS,
          validation_data=(x_val, y_val), callbacks=callbacks.get_list())

loss, accuracy = model.evaluate(x_val, y_val, verbose=0)
print("Validation loss %.4f, accuracy %.4f" % (loss, accuracy))
