"""The eight attribution methods on a small digits network, each explaining the true class.

Every method of ``custom_keras.techniques.attribution`` is registered with its
defaults: Grad-CAM, Grad-CAM++ and Score-CAM over the last convolution, guided
backpropagation (with guided Grad-CAM beside it), SmoothGrad, Integrated
Gradients, occlusion and LRP. The images' true digits are given to the callbacks
(``visualization_labels``), so Grad-CAM explains the true class while the others
explain the predicted one, and the dashboards name the class and its probability.

Run it with ``python attribution_methods.py``; outside the web tool the results land
beside this script. ``EPOCHS`` (environment) sets the number of epochs.
"""
import os

import keras

from custom_keras.callbacks import CustomCallbacks
from custom_keras.reference import load_digits_28

EPOCHS = int(os.environ.get("EPOCHS", "2"))
BATCH_SIZE = 64
# The true digit of each visualization image in images/ (given, not guessed from the name).
LABELS = {"digit_0.png": 0, "digit_3.png": 3, "digit_5_rgb.png": 5, "digit_7.png": 7}

print("Loading the digits")
x_train, y_train = load_digits_28(size=1000, shift=2, seed=0)
x_val, y_val = load_digits_28(size=300, shift=2, seed=1)

print("Creating the model")
keras.utils.set_random_seed(0)  # the same weights every run, so the maps are comparable
model = keras.Sequential([
    keras.Input((28, 28, 1)),
    keras.layers.Conv2D(16, (3, 3), activation="relu"),   # layer 0
    keras.layers.Conv2D(16, (3, 3), activation="relu"),   # layer 1: Grad-CAM's layer
    keras.layers.MaxPooling2D((2, 2)),
    keras.layers.Flatten(),
    keras.layers.Dense(32, activation="relu"),
    keras.layers.Dense(10, activation="softmax"),
])
model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
model.summary()

callbacks = CustomCallbacks(os.path.dirname(os.path.abspath(__file__)), base_interval=8,
                            visualization_labels=LABELS,
                            class_names=["zero", "one", "two", "three", "four", "five", "six",
                                         "seven", "eight", "nine"])
callbacks.register_training_progress()
callbacks.register_grad_cam(class_index="label")
callbacks.register_grad_cam_plus_plus()
callbacks.register_score_cam()
callbacks.register_guided_backprop()
callbacks.register_smooth_grad()
callbacks.register_integrated_gradients()
callbacks.register_occlusion()
callbacks.register_lrp()

print("Training for %d epochs" % EPOCHS)
model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=EPOCHS,
          validation_data=(x_val, y_val), callbacks=callbacks.get_list())

loss, accuracy = model.evaluate(x_val, y_val, verbose=0)
print("Validation loss %.4f, accuracy %.4f" % (loss, accuracy))
