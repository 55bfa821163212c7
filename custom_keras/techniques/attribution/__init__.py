"""Attribution methods as pure functions over a model and a batch of images.

Each takes a built Keras model (Sequential or Functional, with branches and nested
models) with one input and one output of class scores, and returns float32 maps,
one per image, at the input's height and width (per channel where the method
defines one), unnormalised. Scores are taken before softmax (and before a model
output's sigmoid), except Score-CAM's weights, which are softmax probabilities as
in the paper. ``class_index`` is None (each image's predicted class), an int, or
"label" with the true classes given as ``labels=`` (ints or one-hot rows).

The model is never changed: graphs are built by walking it layer by layer
(``graph.walk``), traced once per model and method as tf.function graphs with a
fixed input signature, and reused.
"""
from custom_keras.techniques.attribution.cam import grad_cam, grad_cam_plus_plus, score_cam
from custom_keras.techniques.attribution.gradients import (guided_backprop, guided_grad_cam,
                                                           integrated_gradients, smooth_grad)
from custom_keras.techniques.attribution.lrp import lrp
from custom_keras.techniques.attribution.occlusion import occlusion

__all__ = ["grad_cam", "grad_cam_plus_plus", "score_cam", "guided_backprop", "guided_grad_cam",
           "smooth_grad", "integrated_gradients", "occlusion", "lrp"]
