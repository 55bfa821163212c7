"""The thesis' MNIST example, ported to Keras 3, with offline digits.

Trains the thesis' MNIST network on scikit-learn's digits upscaled to 28x28
(nothing is downloaded) and registers all six visualization callbacks with the
thesis' parameters: five snapshots per epoch, deconvolution of the pooling
layer's 8 most active feature maps, deep visualization of all 10 output units.

Run it with ``python mnist_digits.py``; outside the web tool the results land
beside this script (``results/``, ``networks/``). The visualization images are
the ones in ``images/``. ``EPOCHS`` (environment) sets the number of epochs.
"""
import os

import keras

from custom_keras.callbacks import CustomCallbacks
from custom_keras.reference import load_digits_28

EPOCHS = int(os.environ.get("EPOCHS", "2"))
BATCH_SIZE = 128

print("Loading the digits")
x_train, y_train = load_digits_28(size=6000, shift=2, seed=0)
x_val, y_val = load_digits_28(size=1000, shift=2, seed=1)

print("Creating the model")
inputs = keras.Input((28, 28, 1))                                   # layer 0
x = keras.layers.Conv2D(32, (3, 3), activation="relu")(inputs)      # layer 1
x = keras.layers.Conv2D(32, (3, 3), activation="relu")(x)           # layer 2
x = keras.layers.MaxPooling2D((2, 2))(x)                            # layer 3
x = keras.layers.Dropout(0.25)(x)                                   # layer 4
x = keras.layers.Flatten()(x)                                       # layer 5
x = keras.layers.Dense(128, activation="relu")(x)                   # layer 6
x = keras.layers.Dropout(0.5)(x)                                    # layer 7
x = keras.layers.Dense(64, activation="relu")(x)                    # layer 8
outputs = keras.layers.Dense(10, activation="softmax")(x)           # layer 9
model = keras.Model(inputs, outputs)
model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
model.summary()

# Five snapshots per epoch, as in the thesis.
batches_per_epoch = -(-len(x_train) // BATCH_SIZE)
callbacks = CustomCallbacks(os.path.dirname(os.path.abspath(__file__)),
                            base_interval=max(1, batches_per_epoch // 5))
callbacks.register_network_saver()
callbacks.register_training_progress()
callbacks.register_layer_activations()
callbacks.register_saliency_maps()
callbacks.register_deconvolutional_network(3, feat_map_amount=8)
callbacks.register_deep_visualization([(9, unit) for unit in range(10)], learning_rate=200,
                                      no_of_iterations=50, l2_decay=0.0001, blur_interval=4,
                                      blur_std=1.0)

print("Training for %d epochs" % EPOCHS)
model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=EPOCHS,
          validation_data=(x_val, y_val), callbacks=callbacks.get_list())

loss, accuracy = model.evaluate(x_val, y_val, verbose=0)
print("Validation loss %.4f, accuracy %.4f" % (loss, accuracy))
